"""``manage.py resilience <subcommand>``: the product's operations in one command.

Subcommands:

- ``status [--json]``: every integration: kind, breaker state (and mode when
  not normal), quota used / limit and level, success rate and p95 latency
  over the last hour, cache hit ratio, calls in flight. Steps:
  1. read every integration's status (integrations/status.py: one store
     round trip and one call figures query for all of them);
  2. print a table (or, with ``--json``, each ``IntegrationStatus.to_dict()``).
  Where each figure comes from (each row's ``scope``) is printed under the
  table: with REDIS_URL, breakers and quotas are the fleet's shared state;
  without it, breakers are the last recorded transition and quotas the
  attempts in the call figures.
- ``breaker {reset,open,close} NAME``: an operator's action on one breaker,
  through ``Integration.operate_breaker`` as the admin's actions (reset: back
  to normal mode and closed; open and close: forced modes). Steps:
  1. find the integration (an unknown name lists the close matches);
  2. act as the operator ``cli:<OS user>``; the model records a BreakerEvent
     naming the operator (a reset that closed the breaker, by the breaker's
     own transition);
  3. print the breaker's new state.
- ``schedules``: install every django-q schedule of the product (idempotent).
- ``backup [--output FILE] [--include SECTION ...]``: the product's configuration and dead
  letters as one JSON file (integrations/backup.py; the optional sections, e.g. ``statistics``,
  only when included). Prints the rows per section on stderr.
- ``restore FILE``: restores such a file all or nothing (the steps are integrations/backup.py's);
  a bad file is refused naming what is wrong, and nothing is restored.
- ``cache warm NAME --keys-from FILE --function dotted.path``: fills the cache for each key of
  FILE (one JSON value a line; blank lines and lines starting with # skipped): ``function(key)``
  is called through the guarded pipeline (``Engine.refresh``, no cache lookup) and its value
  stored under ``cache_key=key``. Everything is checked before the first call (the integration,
  its ``cache_ttl_s``, the file, every line, the function); a key whose call fails is reported
  and the others are warmed.
- ``cache clear NAME [--key K | --prefix P]``: clears everything, one string cache key, or the
  string keys starting with P (``Integration.clear_cache``): every process's L1 within 1 s.
"""

from __future__ import annotations

import difflib
import importlib
import getpass
import json
import os
import sys

from django.core.management.base import CommandError
from django.utils import timezone

from integrations.backup import InvalidBackup, registered_sections, restore_backup, write_backup
from integrations.management.base import ResilienceCommand
from integrations.models import BREAKER_ACTIONS, Integration
from integrations.resilience import get_engine
from integrations.resilience.breaker import CLOSED, OPEN
from integrations.resilience.cache import CacheUnavailable
from integrations.resilience.policy import MODE_NORMAL
from integrations.schedules import install_schedules
from integrations.status import FIGURES_MINUTES, PROCESS, RECORDED, SHARED, read_statuses

COLUMNS = ("NAME", "KIND", "BREAKER", "QUOTA", "SUCCESS 1h", "P95 1h", "CACHE HITS", "IN FLIGHT")


# -- status: one document, rendered as a table or JSON ---------------------------------------

def collect_status(names=None, *, calling_process: bool = False) -> dict:
    """The status document of every integration (or of ``names``), as ``status --json`` prints it.

    Each row is ``IntegrationStatus.to_dict()`` (integrations/status.py). ``calling_process``: a
    process that makes the calls itself (the demo) shows its own breakers and quotas without
    Redis; this command, which makes none, shows the recorded ones (scope ``recorded``).
    """
    rows = Integration.objects.select_related("breaker_state").order_by("name")
    if names is not None:
        rows = rows.filter(name__in=names)
    statuses = read_statuses(rows, calling_process=calling_process)
    return {
        "generated_at": timezone.now().isoformat(),
        "figures_minutes": FIGURES_MINUTES,
        "integrations": [status.to_dict() for status in statuses],
    }


def dumps(document: dict) -> str:
    return json.dumps(document, indent=2, sort_keys=True)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def breaker_text(row: dict) -> str:
    return row["state"] if row["mode"] == MODE_NORMAL else f"{row['state']} ({row['mode']})"


def quota_text(quota: dict) -> str:
    parts = [f"{quota[window]['used']}/{quota[window]['limit']} {label}"
             for window, label in (("hourly", "per hour"), ("daily", "per day")) if quota[window]["limit"]]
    return f"{', '.join(parts)} {quota['level']}" if parts else "-"


def table_row(row: dict) -> tuple[str, ...]:
    figures = row["figures"]
    p95 = figures["latency_p95_ms"] if figures else None
    return (row["name"], row["kind"], breaker_text(row), quota_text(row["quota"]),
            percent(figures["success_rate"] if figures else None), "-" if p95 is None else f"{p95:.0f} ms",
            percent(row["cache"]["hit_ratio"]), str(row["in_flight"]))


SCOPE_NOTES = {
    SHARED: "Breakers and quotas: the fleet's shared state (Redis).",
    PROCESS: "Breakers and quotas: this process's (Redis is unset or unreachable).",
    RECORDED: ("Breakers: the last transition recorded by any process; quotas: attempts this hour and today "
               "in the call figures (no REDIS_URL: each process has its own breakers)."),
}


def notes(rows: list[dict]) -> list[str]:
    """What the table's figures are, under it."""
    lines = [SCOPE_NOTES[scope] for scope in (SHARED, PROCESS, RECORDED) if any(row["scope"] == scope for row in rows)]
    if any(row["figures"] is not None for row in rows):
        lines.append(f"Success rate, p95 and cache hits: the last {FIGURES_MINUTES} minutes of call figures "
                     f"(written by each process every few seconds).")
    else:
        lines.append("No call figures (the monitoring app is not installed): cache hits are this process's.")
    lines.append("In flight: this process's calls.")
    return lines


# -- breaker: operator actions --------------------------------------------------------------

def operator_name() -> str:
    """Who runs the command, as recorded in BreakerEvent.by."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return f"cli:uid-{os.getuid()}"


def find_integration(name: str) -> Integration:
    integration = Integration.objects.filter(name=name).first()
    if integration is not None:
        return integration
    names = list(Integration.objects.values_list("name", flat=True))
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        hint = f" Did you mean: {', '.join(close)}?"
    elif names:
        hint = " `manage.py resilience status` lists them."
    else:
        hint = " There are no integrations yet."
    raise CommandError(f'Unknown integration "{name}".{hint}')


def read_keys(path: str) -> list:
    """The cache keys of a --keys-from file: one JSON value a line, all read before any is used."""
    try:
        if path == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(path, encoding="utf-8") as stream:
                lines = stream.read().splitlines()
    except OSError as error:
        raise CommandError(f"--keys-from: cannot read {path}: {error.strerror}.") from None
    except UnicodeDecodeError as error:
        raise CommandError(f"--keys-from: {path} is not UTF-8 text ({error.reason}).") from None
    keys = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            keys.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise CommandError(f"--keys-from: {path}, line {number}: not a JSON value ({error.msg}); "
                               f"a string key is written in quotes, e.g. \"EUR\". Nothing was warmed.") from None
    if not keys:
        raise CommandError(f"--keys-from: {path} has no keys.")
    return keys


def import_function(path: str):
    """The callable named by --function (module.attribute)."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise CommandError(f"--function: {path!r} is not a dotted path (module.function).")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CommandError(f"--function: cannot import {module_name}: {error}.") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise CommandError(f"--function: {module_name} has no function {attribute!r}.")
    return function


class Command(ResilienceCommand):
    help = ("Operate the resilience layer: status, breaker {reset,open,close} NAME, schedules, backup, restore, "
            "cache {warm,clear} NAME.")

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="{status,breaker,schedules,backup,restore,cache}")
        status = sub.add_parser("status", help="Every integration's breaker, quota, success rate, p95 and cache.")
        status.add_argument("--json", action="store_true", help="Print the status as a JSON document.")
        breaker = sub.add_parser("breaker", help="Reset, force open or force close one integration's breaker.")
        breaker.add_argument("action", choices=tuple(BREAKER_ACTIONS),
                             help="reset: normal mode, closed; open: forced open; close: forced closed.")
        breaker.add_argument("name", metavar="NAME", help="The integration's name.")
        sub.add_parser("schedules", help="Install every django-q schedule of the product (idempotent).")
        backup = sub.add_parser("backup", help="Write the product's configuration and dead letters as JSON.")
        backup.add_argument("--output", "-o", default="-", metavar="FILE", help="Where to write it (default: stdout).")
        backup.add_argument("--include", nargs="+", default=[], metavar="SECTION",
                            help="Optional sections to add: " + ", ".join(
                                section.name for section in registered_sections() if section.optional) + ".")
        restore = sub.add_parser("restore", help="Restore a backup, all or nothing (idempotent).")
        restore.add_argument("file", metavar="FILE", help="A file written by `resilience backup` (- for stdin).")
        cache = sub.add_parser("cache", help="Warm or clear an integration's response cache.")
        cache_sub = cache.add_subparsers(dest="cache_action", required=True, metavar="{warm,clear}")
        warm = cache_sub.add_parser("warm", help="Fill the cache for each key of a file, through the pipeline.")
        warm.add_argument("name", metavar="NAME", help="The integration's name.")
        warm.add_argument("--keys-from", required=True, metavar="FILE",
                          help="One JSON value a line (e.g. \"EUR\"): the cache keys (- for stdin).")
        warm.add_argument("--function", required=True, metavar="DOTTED.PATH",
                          help="What fetches a key's value: called as function(key).")
        clear = cache_sub.add_parser("clear", help="Clear cached responses in every process (within 1 s).")
        clear.add_argument("name", metavar="NAME", help="The integration's name.")
        scope = clear.add_mutually_exclusive_group()
        scope.add_argument("--key", metavar="K", help="Only this string cache key.")
        scope.add_argument("--prefix", metavar="P", help="Only the string cache keys starting with P.")

    def handle(self, *args, subcommand, **options):
        return getattr(self, f"handle_{subcommand}")(**options)

    def handle_status(self, **options):
        document = collect_status()
        if options["json"]:
            self.stdout.write(dumps(document))
            return
        rows = document["integrations"]
        if not rows:
            self.stdout.write("No integrations. Add them in the admin, or with "
                              "`manage.py integrations import FILE`.")
            return
        cells = [COLUMNS, *(table_row(row) for row in rows)]
        widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
        colours = {CLOSED: self.style.SUCCESS, OPEN: self.style.ERROR}
        for index, line in enumerate(cells):
            padded = [cell.ljust(width) for cell, width in zip(line, widths)]
            if index:
                colour = colours.get(rows[index - 1]["state"], self.style.WARNING)
                padded[2] = colour(padded[2])
            self.stdout.write("  ".join(padded).rstrip())
        self.stdout.write("")
        for line in notes(rows):
            self.stdout.write(line)

    def handle_breaker(self, action, name, **options):
        integration = find_integration(name)
        shared = get_engine().store.shared
        operator = operator_name()
        integration.operate_breaker(action, operator)
        integration.refresh_from_db()
        (after,) = read_statuses([integration], figures_minutes=None, calling_process=False)
        self.stdout.write(f"{integration.name}: breaker {after.state}, mode {integration.mode} "
                          f"({BREAKER_ACTIONS[action]} by {operator})")
        if action == "reset" and not shared:
            self.stderr.write(self.style.WARNING(
                "No shared state (REDIS_URL is unset): each process has its own breaker. The mode is back to "
                "normal everywhere within RESILIENCE_POLICY_REFRESH_S seconds; a breaker another process opened "
                "closes after its own reset timeout and trial calls."))

    def handle_schedules(self, **options):
        installed = install_schedules()
        if not installed:
            self.stdout.write("No schedules are registered.")
        for spec, created in installed:
            verb = "installed" if created else "updated"
            self.stdout.write(f"{verb} {spec.name}: {spec.func} every {spec.minutes} min")

    def handle_backup(self, output, include, **options):
        try:
            if output == "-":
                counts = write_backup(self.stdout, include)
            else:
                with open(output, "w", encoding="utf-8") as stream:
                    counts = write_backup(stream, include)
        except InvalidBackup as error:
            raise CommandError(str(error)) from None
        self.stderr.write("backed up " + ", ".join(f"{name}: {count}" for name, count in counts.items())
                          + ("" if output == "-" else f" to {output}"))

    def handle_cache(self, cache_action, name, **options):
        integration = find_integration(name)
        if cache_action == "clear":
            if options["prefix"] == "":
                raise CommandError("--prefix: an empty prefix would clear everything; leave it out for that.")
            try:
                generation = integration.clear_cache(key=options["key"], prefix=options["prefix"])
            except CacheUnavailable as exc:
                raise CommandError(f"{exc}. Nothing was cleared.") from exc
            what = (f"key {options['key']!r}" if options["key"] is not None
                    else f"keys starting with {options['prefix']!r}" if options["prefix"] is not None
                    else f"everything (cache version {integration.cache_version})")
            self.stdout.write(f"{integration.name}: cleared {what}, generation {generation}; every process's "
                              f"L1 stops serving it within 1 s.")
            return
        if integration.cache_ttl_s <= 0:
            raise CommandError(f"{name}: cache_ttl_s is {integration.cache_ttl_s}: responses are not cached, "
                               f"nothing to warm.")
        keys = read_keys(options["keys_from"])
        function = import_function(options["function"])
        engine, failed = get_engine(), []
        for key in keys:
            result = engine.refresh(integration.name, function, key, cache_key=key)
            if not result.ok:
                failed.append((key, result.error))
        self.stdout.write(f"{integration.name}: warmed {len(keys) - len(failed)} of {len(keys)} keys.")
        if failed:
            shown = "; ".join(f"{json.dumps(key)}: {error.category.value} {error.message}" for key, error in failed[:5])
            more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
            raise CommandError(f"{len(failed)} keys not warmed: {shown}{more}")

    def handle_restore(self, file, **options):
        try:
            if file == "-":
                report = restore_backup(sys.stdin)
            else:
                with open(file, encoding="utf-8") as stream:
                    report = restore_backup(stream)
        except OSError as error:
            raise CommandError(f"Cannot read {file}: {error.strerror}.") from None
        except InvalidBackup as error:
            raise CommandError(f"{file}: {error} Nothing was restored.") from None
        for line in report.lines():
            self.stdout.write(line)
