"""``manage.py integrations {import,export} FILE``: every integration's policy as a YAML or JSON file.

The format is chosen by FILE's extension (.yaml, .yml, .json) or ``--format``;
FILE ``-`` is stdin (import) or stdout (export) and needs ``--format``::

    version: 1
    integrations:
      - name: billing
        kind: external_api
        description: Payment provider API
        failure_threshold: 5
        hourly_limit: 1000

``export FILE`` writes every integration: name, kind, description and every
knob (``KNOB_NAMES``), in a file replaced whole (written aside, then renamed).

``import FILE [--dry-run]``, step by step:

1. read and parse FILE; a parse error names the line and column;
2. check the document (a mapping with an ``integrations`` list, version 1)
   and each entry: a mapping with a name, no name twice, only known fields,
   each of the right type;
3. in one transaction, match entries to rows by name: a new row takes every
   knob it is not given from its kind's preset; an existing row changes only
   the fields given; every row is validated with ``full_clean()``;
4. if anything is wrong, print every error (``FILE: integration "NAME":
   FIELD: message``) and write nothing;
5. otherwise save the created and changed rows (nothing with ``--dry-run``)
   and print one line per integration: created, updated (with what changed)
   or unchanged. Importing the same file twice changes nothing the second time.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.core.management.base import CommandError
from django.db import models, transaction

from integrations.management.base import ResilienceCommand
from integrations.models import Integration
from integrations.resilience.policy import KINDS, KNOB_NAMES

FORMAT_VERSION = 1
FIELDS = ("name", "kind", "description", *KNOB_NAMES)
EXTENSIONS = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}
FORMATS = ("yaml", "json")
STDIO = "-"
TOP_LEVEL_KEYS = ("version", "integrations")


# -- the document ------------------------------------------------------------------------------

def export_document() -> dict:
    """Every integration, by name, with its kind, description and every knob."""
    return {
        "version": FORMAT_VERSION,
        "integrations": [{name: getattr(row, name) for name in FIELDS} for row in Integration.objects.order_by("name")],
    }


def dump(document: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, default_flow_style=False)


def parse(text: str, fmt: str, source: str):
    """The parsed document; a CommandError naming the line and column when the parser gives them."""
    if fmt == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise CommandError(f"{source}: line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}.") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CommandError(f"{source}: {where}not valid YAML: {problem}.") from None


def describe_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def close_match(word: str, candidates) -> str:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean {matches[0]!r}?" if matches else ""


def type_error(model_field: models.Field, value) -> str | None:
    """Why ``value`` cannot go into ``model_field`` as it is, or None when its type fits."""
    if value is None:
        return None if model_field.null else "This field cannot be null."
    if isinstance(model_field, models.BooleanField):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(model_field, models.IntegerField):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(model_field, models.FloatField):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        expected = "a finite number"
    else:
        ok, expected = isinstance(value, str), "a string"
    return None if ok else f"Expected {expected}, got {describe_value(value)}."


# -- checking and applying entries -----------------------------------------------------------

class ImportFailed(Exception):
    """Some entries are wrong; ``errors`` has one line each and nothing was written."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.errors = errors
        count = f"{len(errors)} error{'s' if len(errors) != 1 else ''}"
        super().__init__("\n".join([*errors, f"Nothing was imported: {count} in {source}."]))


@dataclass
class Outcome:
    name: str
    action: str  # created | updated | unchanged
    changes: dict = field(default_factory=dict)  # field -> (old, new), for updated rows

    def __str__(self) -> str:
        if self.action != "updated":
            return f"{self.action} {self.name}"
        changed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in self.changes.items())
        return f"updated {self.name}: {changed}"


def check_document(document, source: str) -> list:
    """The list of entries; a CommandError when the document's shape is wrong."""
    if not isinstance(document, dict):
        got = "nothing" if document is None else describe_value(document)
        raise CommandError(f'{source}: expected a mapping with an "integrations" list at the top, got {got}.')
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            raise CommandError(f"{source}: unknown top-level key {key!r}.{close_match(str(key), TOP_LEVEL_KEYS)} "
                               f"Expected: {', '.join(TOP_LEVEL_KEYS)}.")
    version = document.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CommandError(f"{source}: version: this command reads version {FORMAT_VERSION}, "
                           f"got {describe_value(version)}.")
    entries = document.get("integrations")
    if not isinstance(entries, list):
        got = "nothing" if entries is None else describe_value(entries)
        raise CommandError(f'{source}: "integrations" must be a list of integrations, got {got}.')
    return entries


@dataclass
class EntryCheck:
    errors: list[str] = field(default_factory=list)
    bad_fields: set = field(default_factory=set)  # unknown or of the wrong type: left out of the row, reported
    buildable: bool = True  # False: no row can be built from the entry at all


def check_entry(position: int, entry, source: str, first_seen: dict) -> EntryCheck:
    """One entry's shape, name and field types."""
    where = f"{source}: integration #{position}"
    if not isinstance(entry, dict):
        return EntryCheck([f"{where}: expected a mapping of fields, got {describe_value(entry)}."], buildable=False)
    name = entry.get("name")
    if name is None or name == "":
        return EntryCheck([f"{where}: name: This field is required."], buildable=False)
    if not isinstance(name, str):
        return EntryCheck([f"{where}: name: Expected a string, got {describe_value(name)}."], buildable=False)
    where = f'{source}: integration "{name}"'
    if name in first_seen:
        return EntryCheck([f'{where}: name: Duplicate name: integrations #{first_seen[name]} and #{position} '
                           f'are both named "{name}".'], buildable=False)
    first_seen[name] = position
    check = EntryCheck()
    for key, value in entry.items():
        if key not in FIELDS:
            check.errors.append(f"{where}: {key}: Unknown field.{close_match(str(key), FIELDS)}")
            check.bad_fields.add(key)
            continue
        problem = type_error(Integration._meta.get_field(key), value)
        if problem is None and key == "kind" and value not in KINDS:
            problem = f"Unknown kind {value!r}.{close_match(value, KINDS)} Expected one of: {', '.join(KINDS)}."
            check.buildable = False  # a new row of an unknown kind has no preset to start from
        if problem:
            check.errors.append(f"{where}: {key}: {problem}")
            check.bad_fields.add(key)
    return check


def build(entry: dict, existing: Integration | None) -> tuple[Integration, dict]:
    """The row an entry describes, unsaved, and what it changes (field -> (old, new)) on an existing row."""
    values = {key: value for key, value in entry.items() if key != "name"}
    if existing is None:
        # a new row: knobs not given come from the kind's preset (the model's constructor does it)
        return Integration(name=entry["name"], **values), {}
    changes = {key: (getattr(existing, key), value) for key, value in values.items() if getattr(existing, key) != value}
    for key, (_, value) in changes.items():
        setattr(existing, key, value)
    return existing, changes


def validation_lines(exc: ValidationError, where: str, skip=()) -> list[str]:
    lines = []
    for name, messages in exc.message_dict.items():
        if name in skip:
            continue
        label = "" if name == NON_FIELD_ERRORS else f"{name}: "
        lines.extend(f"{where}: {label}{message}" for message in messages)
    return lines


def sync_integrations(entries: list, source: str, *, dry_run: bool = False) -> list[Outcome]:
    """Create or update integrations by name from plain entries, all or nothing.

    Raises ImportFailed (nothing written) listing every wrong entry's errors
    in file order; returns one Outcome per entry, in order. With ``dry_run``
    nothing is written.
    """
    names = [entry["name"] for entry in entries if isinstance(entry, dict) and isinstance(entry.get("name"), str)]
    errors, outcomes, rows, first_seen = [], [], [], {}
    with transaction.atomic():
        existing = {row.name: row for row in Integration.objects.select_for_update().filter(name__in=names)}
        for position, entry in enumerate(entries, start=1):
            check = check_entry(position, entry, source, first_seen)
            errors.extend(check.errors)
            if not check.buildable:
                continue
            name = entry["name"]
            # fields of the wrong type are left out, so the rest is still validated and reported in one go
            row, changes = build({k: v for k, v in entry.items() if k not in check.bad_fields}, existing.get(name))
            try:
                row.full_clean()
            except ValidationError as exc:
                errors.extend(validation_lines(exc, f'{source}: integration "{name}"', skip=check.bad_fields))
                continue
            if check.errors:
                continue
            action = "created" if row.pk is None else "updated" if changes else "unchanged"
            outcomes.append(Outcome(name, action, changes))
            rows.append((row, action))
        if errors:
            raise ImportFailed(source, errors)
        if not dry_run:
            for row, action in rows:
                if action != "unchanged":
                    row.save()
    return outcomes


# -- the command --------------------------------------------------------------------------------

class Command(ResilienceCommand):
    help = "Import or export integrations as YAML or JSON (by the file's extension, or --format)."
    stealth_options = ("stdin",)

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="{import,export}")
        importing = sub.add_parser("import", help="Create or update integrations by name from FILE (idempotent).")
        importing.add_argument("file", metavar="FILE", help="A .yaml, .yml or .json file; '-' reads stdin.")
        importing.add_argument("--format", choices=FORMATS, help="The file's format, whatever its extension.")
        importing.add_argument("--dry-run", action="store_true", help="Check and report, write nothing.")
        exporting = sub.add_parser("export", help="Write every integration to FILE.")
        exporting.add_argument("file", metavar="FILE", help="A .yaml, .yml or .json file; '-' writes stdout.")
        exporting.add_argument("--format", choices=FORMATS, help="The file's format, whatever its extension.")

    def handle(self, *args, subcommand, **options):
        return getattr(self, f"handle_{subcommand}")(**options)

    def file_format(self, path: str, given: str | None) -> str:
        if given:
            return given
        if path == STDIO:
            raise CommandError("FILE is '-': say which format with --format yaml or --format json.")
        suffix = Path(path).suffix.lower()
        if suffix not in EXTENSIONS:
            raise CommandError(f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}: "
                               f"name it .yaml, .yml or .json, or pass --format.")
        return EXTENSIONS[suffix]

    def handle_export(self, file, format=None, **options):
        fmt = self.file_format(file, format)
        document = export_document()
        text = dump(document, fmt)
        count = len(document["integrations"])
        if file == STDIO:
            self.stdout.write(text, ending="")
            return
        write_replacing(file, text)
        self.stdout.write(f"exported {count} integration{'s' if count != 1 else ''} to {file}")

    def handle_import(self, file, format=None, dry_run=False, **options):
        fmt = self.file_format(file, format)
        source = "<stdin>" if file == STDIO else file
        text = (options.get("stdin") or sys.stdin).read() if file == STDIO else read_text(file)
        entries = check_document(parse(text, fmt, source), source)
        try:
            outcomes = sync_integrations(entries, source, dry_run=dry_run)
        except ImportFailed as exc:
            raise CommandError(str(exc)) from None
        for outcome in outcomes:
            self.stdout.write(str(outcome))
        actions = [outcome.action for outcome in outcomes]
        summary = ", ".join(f"{actions.count(action)} {action}" for action in ("created", "updated", "unchanged"))
        self.stdout.write(f"{summary}{' (dry run: nothing written)' if dry_run else ''}")


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file.") from None
    except IsADirectoryError:
        raise CommandError(f"{path}: is a directory, not a file.") from None
    except UnicodeDecodeError as exc:
        raise CommandError(f"{path}: not UTF-8 text (byte {exc.start}).") from None
    except OSError as exc:
        raise CommandError(f"{path}: cannot be read: {exc.strerror}.") from None


def file_mode(target: Path) -> int:
    """The replaced file's permissions, or those a new file gets under the umask (mkstemp's are 0600)."""
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_replacing(path: str, text: str) -> None:
    """Write ``text`` beside ``path``, then rename it over ``path``: a reader never sees half a file."""
    target = Path(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise CommandError(f"{path}: cannot be written: {exc.strerror}.") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, file_mode(target))
        os.replace(temporary, target)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise CommandError(f"{path}: cannot be written: {exc.strerror}.") from None
