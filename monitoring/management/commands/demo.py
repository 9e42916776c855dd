"""``manage.py demo``: demo integrations against a simulated flaky upstream, live on the console.

Steps:

1. start the simulated upstream on 127.0.0.1 (``--port``, or a free port),
   with its faults: a payments outage on a schedule, erratic quotes, a slow
   and failing LLM (``monitoring.demo.scenario``);
2. create or update the demo integrations (demo-payments, demo-quotes,
   demo-llm) as ``integrations import`` would: idempotent; and reset their
   breakers, so a run starts closed;
3. with ``--serve [ADDRESS:]PORT``, serve the site (admin, API) from this
   process, so the console shows this process's breakers and quotas even
   without Redis;
4. start the traffic: worker threads calling each integration through the
   pipeline (``execute`` with a dead letter for charges, the http Client
   for quotes and completions), to 127.0.0.1 only;
5. every few seconds, flush the call statistics and print one status line
   (unless ``--quiet``); every ~10 s, run the watchdog and print the alerts
   it raised;
6. after ``--duration`` seconds, or at Ctrl-C (or SIGTERM): stop the
   traffic, the upstream and the site (threads joined, sockets closed),
   flush the statistics and print a summary.

Dead letters are redriven by the django-q cluster (``manage.py qcluster``),
which needs ``RESILIENCE_DLQ_HANDLER_MODULES=monitoring.demo.handlers`` to
know the handler ``demo.charge``; ``make up`` starts it so.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from integrations.management.commands.integrations import ImportFailed, sync_integrations
from integrations.management.commands.resilience import breaker_text, collect_status, quota_text
from integrations.models import BreakerState, Integration
from integrations.persistence import write_transition
from integrations.resilience import get_engine
from integrations.resilience.breaker import CLOSED, Transition
from monitoring.demo.scenario import (NAMES, Tally, Timing, Traffic, build_upstream, integration_entries,
                                      integration_summary)
from monitoring.demo.site import SiteServer, parse_address

OPERATOR = "demo"


def flush_statistics() -> None:
    """Write this process's buffered call statistics now (the console and the watchdog read them)."""
    if apps.is_installed("monitoring"):
        from monitoring.stats import buffer, flush_quietly

        flush_quietly(buffer)


def dead_letter_counts() -> dict[str, int] | None:
    if not apps.is_installed("integrations.dlq"):
        return None
    from django.db.models import Count

    from integrations.dlq.models import DeadLetter

    rows = (DeadLetter.objects.filter(integration_name__in=NAMES).order_by().values("status")
            .annotate(n=Count("pk")).values_list("status", "n"))
    return dict(rows)


def alert_counts() -> dict[str, int] | None:
    if not apps.is_installed("monitoring"):
        return None
    from monitoring.models import Alert

    return Alert.objects.open_counts_by_severity()


def counts_text(label: str, counts: dict[str, int] | None) -> str | None:
    if counts is None:
        return None
    shown = ", ".join(f"{n} {key}" for key, n in counts.items() if n)
    return f"{label}: {shown or 'none'}"


class Command(BaseCommand):
    help = ("Run demo integrations against a simulated flaky upstream on 127.0.0.1: breakers open and close, "
            "quotas fill, fallbacks and dead letters appear, alerts are raised.")
    # ``timing``: an monitoring.demo.scenario.Timing (tests run the scenario faster)
    stealth_options = ("timing",)

    def add_arguments(self, parser):
        parser.add_argument("--duration", type=float, metavar="SECONDS",
                            help="Stop after this many seconds (default: run until Ctrl-C).")
        parser.add_argument("--port", type=int, default=0,
                            help="The simulated upstream's port on 127.0.0.1 (default: a free port).")
        parser.add_argument("--serve", metavar="[ADDRESS:]PORT",
                            help="Also serve the site from this process, e.g. --serve 127.0.0.1:8000.")
        parser.add_argument("--quiet", action="store_true",
                            help="No status lines: only the start and the summary.")

    def handle(self, *args, duration=None, port=0, serve=None, quiet=False, timing=None, **options):
        if duration is not None and duration <= 0:
            raise CommandError(f"--duration must be more than 0 seconds, got {duration:g}.")
        if not 0 <= port <= 65535:
            raise CommandError(f"--port must be from 1 to 65535 (0: a free port), got {port}.")
        try:
            site_address = parse_address(serve) if serve else None
        except ValueError as exc:
            raise CommandError(f"--serve: {exc}.") from None
        timing = timing or Timing()
        self.quiet = quiet
        self.timing = timing
        stop = threading.Event()
        upstream = build_upstream(timing, port)
        tally = Tally()
        bus = get_engine().bus
        site = traffic = None
        previous_sigterm = self._stop_on_sigterm()
        dlq_logger = logging.getLogger("integrations.dlq")
        dlq_level = dlq_logger.level
        started = time.monotonic()
        try:
            try:
                upstream.start()
            except OSError as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(f"Simulated upstream: {upstream.url} ({timing.describe()})")
            self.prepare_integrations(timing)
            if site_address is not None:
                try:
                    site = SiteServer(*site_address).start()
                except OSError as exc:
                    raise CommandError(str(exc)) from None
                self.stdout.write(self.style.SUCCESS(f"Site: {site.url}/admin/"))
            # one INFO line per stored dead letter would bury the status lines; the counts are in them (set
            # after the site started: loading the WSGI application configures logging again)
            dlq_logger.setLevel(max(dlq_logger.getEffectiveLevel(), logging.WARNING))
            tally.subscribe(bus)
            traffic = Traffic(upstream.url, timing, stop)
            traffic.start()
            workers = ", ".join(f"{count} {name}" for name, count in Traffic.WORKERS)
            until = f"for {duration:g} s" if duration else "until Ctrl-C"
            self.stdout.write(f"Traffic: {workers} worker threads, {until}.")
            self.loop(time.monotonic(), duration, stop, tally)
        except KeyboardInterrupt:
            self.stdout.write("\nStopping...")
        finally:
            stop.set()
            # workers finish the call they are making (at most an integration's timeout), then the upstream stops
            still_running = traffic.join() if traffic is not None else []
            upstream.stop()
            tally.unsubscribe(bus)
            if site is not None:
                site.stop()
            self._restore_sigterm(previous_sigterm)
            dlq_logger.setLevel(dlq_level)
        flush_statistics()
        if traffic is not None and traffic.errors:
            raise CommandError(f"a demo worker failed: {traffic.errors[0]!r}") from traffic.errors[0]
        if still_running:
            raise CommandError(f"demo workers did not stop within 30 s: {', '.join(still_running)}")
        self.summary(time.monotonic() - started, tally, upstream.answers())

    # -- steps --------------------------------------------------------------------------------

    def prepare_integrations(self, timing: Timing) -> None:
        try:
            outcomes = sync_integrations(integration_entries(timing), "the demo's integrations")
        except ImportFailed as exc:
            raise CommandError(str(exc)) from None
        for integration in Integration.objects.select_related("breaker_state").filter(name__in=NAMES):
            self.start_closed(integration)
        self.stdout.write("Demo integrations: " + ", ".join(f"{o.name} ({o.action})" for o in outcomes))

    @staticmethod
    def start_closed(integration: Integration) -> None:
        """Reset the breaker; without shared state, also correct a record a past run left open.

        A fresh process's breakers are closed, so its reset makes no transition;
        the recorded state (what ``resilience status`` shows without Redis) of a
        previous run that stopped with the breaker open is set right here.
        """
        if integration.reset_breaker(by=OPERATOR) is not None or get_engine().store.shared:
            return
        try:
            recorded = integration.breaker_state.state
        except BreakerState.DoesNotExist:
            return
        if recorded != CLOSED:
            write_transition(Transition(integration.name, recorded, CLOSED, "demo start: breaker reset",
                                        time.time(), OPERATOR))

    def loop(self, started: float, duration: float | None, stop: threading.Event, tally: Tally) -> None:
        timing = self.timing
        next_status = started + timing.status_every_s
        next_watchdog = started + timing.watchdog_every_s
        end = started + duration if duration else None
        while not stop.is_set():
            now = time.monotonic()
            if end is not None and now >= end:
                return
            if now >= next_watchdog:
                next_watchdog = now + timing.watchdog_every_s
                self.watchdog()
            if now >= next_status:
                next_status = now + timing.status_every_s
                self.status(now - started, tally)
            stop.wait(max(min(next_status, next_watchdog, end or next_status) - time.monotonic(), 0.01))

    def watchdog(self) -> None:
        """One watchdog run (it flushes the statistics first); prints the alerts it raised or escalated."""
        if not apps.is_installed("monitoring"):
            return
        from monitoring import watchdog

        try:
            report = watchdog.run()
        except DatabaseError as exc:
            self.stderr.write(self.style.WARNING(
                f"watchdog run failed (retried in {self.timing.watchdog_every_s:g} s): {exc}"))
            return
        if self.quiet:
            return
        changed = {*report["changes"]["new"], *report["changes"]["escalated"]}
        for alert in (*report["critical"], *report["warnings"]):
            if alert["id"] in changed:
                style = self.style.ERROR if alert["severity"] == "critical" else self.style.WARNING
                self.stdout.write(style(f"  alert {alert['severity']}: {alert['integration'] or 'site'} "
                                        f"{alert['kind']}: {alert['message']}"))

    def status(self, elapsed_s: float, tally: Tally) -> None:
        """One line: each demo integration's breaker, quota and calls; the dead letters; the alerts."""
        if self.quiet:
            return
        try:
            flush_statistics()
            document = collect_status(names=NAMES, calling_process=True)
            dead_letters, alerts = dead_letter_counts(), alert_counts()
        except DatabaseError as exc:
            self.stderr.write(self.style.WARNING(f"status unavailable this time: {exc}"))
            return
        counts = tally.snapshot()
        parts = []
        for row in document["integrations"]:
            quota = quota_text(row["quota"])
            state = breaker_text(row) + ("" if quota == "-" else f", quota {quota}")
            parts.append(f"{row['name']} [{state}] {integration_summary(counts[row['name']])}")
        parts.extend(text for text in (counts_text("DLQ", dead_letters), counts_text("alerts", alerts)) if text)
        self.stdout.write(f"[{elapsed_s:4.0f}s] " + " | ".join(parts))

    def summary(self, elapsed_s: float, tally: Tally, answers: dict) -> None:
        self.stdout.write(self.style.SUCCESS(f"Demo finished after {elapsed_s:.0f} s."))
        counts = tally.snapshot()
        for name in NAMES:
            self.stdout.write(f"  {name}: {integration_summary(counts[name])}")
        for route, by_status in sorted(answers.items()):
            shown = ", ".join(f"{status}: {n}" for status, n in sorted(by_status.items(), key=lambda kv: str(kv[0])))
            self.stdout.write(f"  upstream {route}: {shown or 'no requests'}")
        for text in (counts_text("dead letters", dead_letter_counts()), counts_text("active alerts", alert_counts())):
            if text:
                self.stdout.write(f"  {text}")

    # -- SIGTERM stops the demo as Ctrl-C does ------------------------------------------------

    @staticmethod
    def _stop_on_sigterm() -> list:
        """Install the handler; returns what to restore ([] off the main thread, where signals cannot be set)."""
        if threading.current_thread() is not threading.main_thread():
            return []

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        return [signal.signal(signal.SIGTERM, interrupt)]

    @staticmethod
    def _restore_sigterm(previous: list) -> None:
        for handler in previous:
            signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)
