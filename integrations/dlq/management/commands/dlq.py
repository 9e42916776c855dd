"""``manage.py dlq {stats,peek,retry,purge}``: the dead letter queue from the command line.

    stats  [--integration NAME]                           counts by status and integration
    peek   [--integration NAME] [--status S] [--id N ...] the latest entries; with --id, each in full
    retry  (--id N ... | --status S | --all) [--integration NAME]
           runs the chosen entries now, here, whatever their next attempt time
           (--all: every waiting entry; dead ones chosen are requeued first)
    purge  (--id N ... | --status S | --all) [--integration NAME]
           deletes finished entries (--all: every finished one); never a waiting one
    replay stores the dead letters this host spooled while the database refused them
           (the scheduled redrive does it too; integrations/dlq/spool.py)
"""

from __future__ import annotations

import json

from django.core.management.base import CommandError
from django.utils import timezone

from integrations.dlq import spool
from integrations.dlq.models import DEAD, FINISHED, STATUSES, WAITING, DeadLetter, check_purgeable
from integrations.dlq.redrive import Redriver
from integrations.management.base import ResilienceCommand

PEEK_LIMIT = 20
PROGRESS_MIN_ENTRIES = 20  # a shorter run ends before a progress bar would say anything


class ProgressBar:
    """One line on stderr, redrawn in place on a terminal, every 10 % otherwise (logs, CI)."""

    WIDTH = 30

    def __init__(self, stream, total: int, label: str) -> None:
        self.stream = stream
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.shown_tenth = -1
        self.live = bool(getattr(stream, "isatty", lambda: False)())

    def advance(self, count: int = 1) -> None:
        self.done = min(self.done + count, self.total)
        tenth = self.done * 10 // self.total
        if self.live or tenth != self.shown_tenth:
            self.shown_tenth = tenth
            self._draw()

    def close(self) -> None:
        if self.live:
            self.stream.write("", ending="\n")

    def _draw(self) -> None:
        filled = self.done * self.WIDTH // self.total
        line = (f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} "
                f"{self.done * 100 // self.total}%")
        self.stream.write(f"\r{line}" if self.live else line, ending="" if self.live else "\n")


class Command(ResilienceCommand):
    help = "Inspect and operate the dead letter queue: stats, peek, retry, purge, replay."

    # Which options each action takes; any other is refused, naming it.
    OPTIONS = {"stats": {"integration"}, "peek": {"integration", "status", "ids"},
               "retry": {"integration", "status", "ids", "all"}, "purge": {"integration", "status", "ids", "all"},
               "replay": set()}

    def add_arguments(self, parser):
        parser.add_argument("action", choices=sorted(self.OPTIONS))
        parser.add_argument("--integration", metavar="NAME", help="Only this integration's entries.")
        parser.add_argument("--status", choices=STATUSES, help="Only entries with this status.")
        parser.add_argument("--id", dest="ids", metavar="N", type=int, nargs="+", help="These entries.")
        parser.add_argument("--all", action="store_true",
                            help="retry: every waiting entry; purge: every finished entry.")

    def handle(self, *args, action, **options):
        given = {name for name in ("integration", "status", "ids", "all") if options.get(name)}
        refused = given - self.OPTIONS[action]
        if refused:
            flags = ", ".join(f"--{'id' if name == 'ids' else name}" for name in sorted(refused))
            raise CommandError(f"{flags}: not an option of 'dlq {action}'")
        if options.get("ids") and any(pk < 1 for pk in options["ids"]):
            raise CommandError("--id: ids are positive integers")
        getattr(self, f"handle_{action}")(**options)

    # -- stats and peek --------------------------------------------------------

    def handle_replay(self, **options):
        report = spool.replay()
        self.stdout.write(f"spooled dead letters: {report['stored']} stored, {report['already_there']} already "
                          f"there, {report['left']} left for a later replay ({report['files']} file(s) replayed)")
        if report["left"]:
            raise CommandError(f"{report['left']} spooled dead letter(s) could not be stored; see the log")

    def handle_stats(self, integration=None, **options):
        entries = DeadLetter.objects.all()
        if integration:
            entries = entries.filter(integration_name=integration)
        stats = entries.stats()
        out = self.stdout
        out.write(f"dead letters: {stats['total']} (waiting {stats['waiting']}, due now {stats['due']})")
        out.write("  " + "  ".join(f"{status} {count}" for status, count in stats["by_status"].items()))
        spooled = spool.pending()
        if spooled:
            out.write(f"spooled on this host, waiting for the database: {spooled} (manage.py dlq replay)")
        if stats["oldest_waiting_at"]:
            out.write(f"oldest waiting since {stats['oldest_waiting_at']}; next attempt at {stats['next_attempt_at']}")
        if stats["by_integration"]:
            out.write("by integration:")
            width = max(len(name) for name in stats["by_integration"])
            for name, counts in stats["by_integration"].items():
                shown = "  ".join(f"{status} {count}" for status, count in counts.items() if count)
                out.write(f"  {name:<{width}}  {shown}")

    def handle_peek(self, integration=None, status=None, ids=None, **options):
        entries = self._filtered(integration, status, ids)
        if ids:
            for entry in entries.order_by("pk"):
                self.stdout.write(json.dumps(entry.as_dict(), indent=2, ensure_ascii=False))
            return
        total = entries.count()
        if not total:
            self.stdout.write("no dead letters match")
            return
        for entry in entries[:PEEK_LIMIT]:
            self.stdout.write(self._line(entry))
        if total > PEEK_LIMIT:
            self.stdout.write(f"(the latest {PEEK_LIMIT} of {total}; narrow with --integration, --status or --id)")

    def _line(self, entry: DeadLetter) -> str:
        when = f"next {entry.next_attempt_at:%Y-%m-%d %H:%M:%S}" if entry.status in WAITING else "-"
        error = f"{entry.last_error_category}: {entry.last_error_message}" if entry.last_error_category else ""
        return (f"#{entry.pk:<6} {entry.integration_name:<16} {entry.handler_name:<24} {entry.status:<9} "
                f"{entry.attempts}/{entry.max_redrives:<4} {when:<24} {error[:100]}")

    # -- retry -----------------------------------------------------------------

    def handle_retry(self, integration=None, status=None, ids=None, all=False, **options):
        self._one_choice(status, ids, all)
        if status and status not in (*WAITING, DEAD):
            raise CommandError(f"--status: {status} entries cannot be retried; choose one of "
                               f"{', '.join((*WAITING, DEAD))}")
        chosen = self._filtered(integration, status, ids)
        if ids:
            chosen = self._checked(lambda: chosen.check_retryable())
        elif all:
            chosen = chosen.waiting()
        # What the run may claim: dead entries chosen become pending, so they are followed by id.
        if status == DEAD:
            to_run = DeadLetter.objects.filter(pk__in=list(chosen.values_list("pk", flat=True)))
        else:
            to_run = chosen
        queued = chosen.retry_now(by="manage.py dlq retry", ask_cluster=False)
        if not queued:
            self.stdout.write("nothing to retry")
            return
        total = to_run.claimable(timezone.now()).count()
        bar = ProgressBar(self.stderr, total, "retry") if total >= PROGRESS_MIN_ENTRIES else None
        try:
            report = Redriver.from_settings().run(to_run, progress=bar and bar.advance)
        finally:
            if bar is not None:
                bar.close()
        self.stdout.write(f"retried {report.processed} of {total}: {report}")

    # -- purge -----------------------------------------------------------------

    def handle_purge(self, integration=None, status=None, ids=None, all=False, **options):
        self._one_choice(status, ids, all)
        if status:
            self._checked(lambda: check_purgeable(status), flag="--status")
        chosen = self._filtered(integration, status, ids)
        kept = chosen.exclude(status__in=FINISHED).count()
        deleted = chosen.purge()
        self.stdout.write(f"deleted {deleted} finished entr{'y' if deleted == 1 else 'ies'}")
        if kept:
            self.stdout.write(f"kept {kept} waiting entr{'y' if kept == 1 else 'ies'}: discard them first")

    # -- shared ----------------------------------------------------------------

    def _filtered(self, integration, status, ids):
        entries = DeadLetter.objects.all()
        if ids:
            entries = self._checked(lambda: entries.with_ids(ids))
        if integration:
            entries = entries.filter(integration_name=integration)
        if status:
            entries = entries.filter(status=status)
        return entries

    @staticmethod
    def _checked(choose, flag="--id"):
        try:
            return choose()
        except (LookupError, ValueError) as exc:
            raise CommandError(f"{flag}: {exc}") from exc

    @staticmethod
    def _one_choice(status, ids, all):
        if sum(bool(choice) for choice in (status, ids, all)) != 1:
            raise CommandError("--id, --status, --all: give exactly one of them to choose the entries")
