"""The redrive: waiting dead letters run again through their integration's pipeline.

A run (``Redriver.run``), step by step:

    1. integrations  those with claimable entries: waiting, unclaimed, and due by
                     the time the run started (so each entry runs at most once a run)
    2. health gate   an integration is held for the rest of the run when its
                     breaker is open (and not yet due for a half-open trial) or
                     forced open, or its quota is critical
    3. rate cap      at most RESILIENCE_DLQ_RATE_PER_MINUTE entries per
                     integration per minute, counted in the Django cache
                     (shared through Redis when REDIS_URL is set)
    4. claim         a batch, under a lease (DeadLetterQuerySet.claim); an entry
                     whose handler was interrupted under a lapsed claim is
                     noted (poison after 3 interruptions) and run again
    5. run           each entry: the lease renewed when the run could outlive
                     it, its start marked under the claim, its handler looked
                     up (unknown: poison), then
                     execute(integration, handler, payload[, context]) without
                     cache, fallbacks or a dead letter of its own
    6. outcome       stored under the claim in the statement that marks the
                     next entry's start (or ends the batch):
                     succeeded; refused by the pipeline (breaker, quota,
                     bulkhead, degraded mode): released uncounted and the
                     integration held; payload rejected (VALIDATION,
                     ValueError, TypeError): dead at once; any other failure:
                     the next redrive after backoff, or dead at max_redrives
    7. repeat        until nothing is claimable or the time budget is spent

The lease of a claim is at least the integration's overall timeout plus a
margin, so a handler that keeps to its timeout is never run twice at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.utils import timezone

from integrations.errors import ErrorCategory
from integrations.resilience import execute, get_engine
from integrations.resilience.breaker import OPEN
from integrations.resilience.policy import MODE_FORCED_OPEN, MODE_NORMAL
from integrations.resilience.quota import CRITICAL

from .handlers import RedriveContext, UnknownHandler, get_handler
from .models import DEAD, SUCCEEDED, DeadLetter, DeadLetterQuerySet, backoff_delay_s, error_record
from integrations.conf import app_settings
from .conf import dlq_settings

logger = logging.getLogger("integrations.dlq")

LEASE_MARGIN_S = 5.0  # beyond the integration's overall timeout: storing the outcome takes time too
FLUSH_EVERY = 100  # outcomes waiting for the next write at most (entries that run no handler)

# Exceptions a handler raises to say "this payload can never work": the entry dies at once.
PAYLOAD_REJECTED = (ValueError, TypeError)


@dataclass
class RedriveReport:
    succeeded: int = 0
    retrying: int = 0  # failed, the next redrive scheduled
    dead: int = 0
    released: int = 0  # refused by the pipeline: given back uncounted
    lost: int = 0  # the claim lapsed before the outcome was stored: another worker takes over
    held: dict[str, str] = field(default_factory=dict)  # integration -> why it was not redriven

    @property
    def processed(self) -> int:
        return self.succeeded + self.retrying + self.dead

    def as_dict(self) -> dict:
        return {"succeeded": self.succeeded, "retrying": self.retrying, "dead": self.dead,
                "released": self.released, "lost": self.lost, "held": dict(self.held)}

    def __str__(self) -> str:
        text = (f"{self.succeeded} succeeded, {self.retrying} to retry, {self.dead} dead, "
                f"{self.released} released")
        if self.lost:
            text += f", {self.lost} lost to another worker"
        if self.held:
            text += "; held: " + ", ".join(f"{name} ({reason})" for name, reason in sorted(self.held.items()))
        return text


class RateCap:
    """Entries redriven per integration per minute, counted over fixed one-minute windows.

    Counts live in the Django cache, so with Redis every worker shares them.
    When the cache fails, this process counts on its own: the cap then holds
    per process instead of not at all.
    """

    def __init__(self, per_minute: int, cache_alias: str, clock: Callable[[], float] = time.time) -> None:
        self.per_minute = per_minute
        self.cache = caches[cache_alias]
        self.clock = clock
        self._local: dict[str, int] = {}

    def _key(self, integration: str) -> str:
        return f"dlq:rate:{integration}:{int(self.clock() // 60)}"

    def reserve(self, integration: str, wanted: int) -> int:
        """Take up to ``wanted`` slots of this minute; returns how many were granted."""
        if not self.per_minute:
            return wanted
        key = self._key(integration)
        used = self._add(key, wanted)
        excess = min(max(used - self.per_minute, 0), wanted)
        if excess:
            self._add(key, -excess)
        return wanted - excess

    def give_back(self, integration: str, unused: int) -> None:
        if self.per_minute and unused > 0:
            self._add(self._key(integration), -unused)

    def _add(self, key: str, delta: int) -> int:
        try:
            self.cache.add(key, 0, timeout=120)
            return self.cache.incr(key, delta)
        except Exception:  # noqa: BLE001 - any cache failure: fall back to counting in this process (see class doc)
            logger.warning("rate cap: cache unavailable, counting in this process", exc_info=True)
            window = key.rsplit(":", 1)[1]
            self._local = {k: v for k, v in self._local.items() if k.endswith(f":{window}")}
            self._local[key] = self._local.get(key, 0) + delta
            return self._local[key]


def hold_reason(engine, policy) -> str | None:
    """Why the integration cannot take redrives now, or None when it can.

    A breaker still open is a reason; one whose reset timeout has passed is
    not, since the next call is its half-open trial and a redrive may be it.
    """
    if policy.mode == MODE_FORCED_OPEN:
        return "breaker forced open"
    if policy.mode == MODE_NORMAL:
        breaker = engine.breaker(policy.name)
        if breaker.state == OPEN and (breaker.opened_at is None
                                      or engine.clock.time() - breaker.opened_at < policy.reset_timeout_s):
            return "breaker open"
    if engine.quota(policy.name).level == CRITICAL:
        return "quota critical"
    return None


def rejected_payload(error) -> bool:
    """Whether a handler's failure says the payload can never work (poison)."""
    return error.category == ErrorCategory.VALIDATION or isinstance(error.__cause__, PAYLOAD_REJECTED)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:100]


@contextlib.contextmanager
def asynchronous_commit(alias: str, enabled: bool):
    """On PostgreSQL, ``synchronous_commit`` off on this connection for the block, then as it was.

    A redrive writes one statement per handler started (its start mark with the
    outcomes before it): waiting for each commit's WAL flush would cost most of
    the run. Without the wait a write is visible and ordered at once, and a
    worker that dies loses nothing; only a crash of the database server itself
    can forget the last fraction of a second of writes (PostgreSQL's
    asynchronous commit: no inconsistency, at most wal_writer_delay x 3). What
    that forgets is redone: an entry whose outcome is forgotten is claimed and
    run again after its lease, with the same idempotency key.
    """
    connection = connections[alias]
    if not enabled or connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        (previous,) = cursor.fetchone()
        cursor.execute("SET synchronous_commit TO off")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('synchronous_commit', %s, false)", [previous])


class Redriver:
    def __init__(self, *, batch_size: int, lease_s: float, rate_cap: RateCap, budget_s: float | None = None,
                 rng: random.Random | None = None, now: Callable[[], datetime] = timezone.now,
                 worker: str | None = None) -> None:
        self.batch_size = batch_size
        self.lease_s = lease_s
        self.rate_cap = rate_cap
        self.budget_s = budget_s
        self.rng = rng or random.Random()
        self.now = now
        self.worker = worker or worker_name()
        self._stop_at: float | None = None

    @classmethod
    def from_settings(cls, *, budget_s: float | None = None, **overrides) -> Redriver:
        knobs = {
            "batch_size": dlq_settings.BATCH_SIZE,
            "lease_s": dlq_settings.LEASE_S,
            "rate_cap": RateCap(dlq_settings.RATE_PER_MINUTE, app_settings.CACHE_ALIAS),
            "budget_s": budget_s,
        }
        knobs.update(overrides)
        return cls(**knobs)

    # -- a run -------------------------------------------------------------------

    def run(self, entries: DeadLetterQuerySet | None = None,
            progress: Callable[[int], None] | None = None) -> RedriveReport:
        """Redrive every claimable entry of ``entries`` (default: the whole queue) once."""
        entries = DeadLetter.objects.all() if entries is None else entries
        with asynchronous_commit(entries.db, dlq_settings.ASYNC_COMMIT):
            return self._run(entries, progress)

    def _run(self, entries: DeadLetterQuerySet, progress: Callable[[int], None] | None) -> RedriveReport:
        report = RedriveReport()
        self._stop_at = None if self.budget_s is None else time.monotonic() + self.budget_s
        due_by = self.now()
        while not self.out_of_time():
            names = list(entries.claimable(self.now(), due_by).exclude(integration_name__in=list(report.held))
                         .order_by().values_list("integration_name", flat=True).distinct())
            claimed_any = False
            for name in names:
                if self.out_of_time():
                    break
                claimed_any |= self._redrive_batch(entries, name, due_by, report, progress)
            if not claimed_any:
                break
        if report.processed or report.released or report.lost:
            logger.info("redrive run by %s: %s", self.worker, report)
        return report

    def out_of_time(self) -> bool:
        """Whether the run's time budget is spent: no new entry is started past it."""
        return self._stop_at is not None and time.monotonic() >= self._stop_at

    def _redrive_batch(self, entries, integration: str, due_by: datetime, report: RedriveReport,
                       progress) -> bool:
        """Gate, cap, claim and run one batch of one integration; False when nothing was claimed."""
        engine = get_engine()
        try:
            policy = engine.registry.get(integration)
        except ImproperlyConfigured as exc:  # the integration was deleted: its entries can never run
            policy, missing = None, str(exc)
        else:
            missing = None
            reason = hold_reason(engine, policy)
            if reason is not None:
                report.held[integration] = reason
                return False
        granted = self.rate_cap.reserve(integration, self.batch_size)
        if not granted:
            report.held[integration] = f"rate cap of {self.rate_cap.per_minute}/min reached"
            return False
        # A run must end inside the lease: at least the integration's overall timeout plus a margin.
        needed_s = (policy.timeout_ms / 1000 if policy else 0) + LEASE_MARGIN_S
        lease = max(self.lease_s, needed_s)
        token, now = uuid.uuid4(), self.now()
        batch, lapsed = entries.claim(integration, granted, token=token, worker=self.worker, now=now, due_by=due_by,
                                      lease_until=now + timedelta(seconds=lease))
        self.rate_cap.give_back(integration, granted - len(batch))
        if not batch:
            return False
        run = _BatchRun(self, batch, token, lease, needed_s, report, progress)
        try:
            if missing is not None:
                run.poison_all(missing)
            else:
                run.run_all(integration, lapsed)
        finally:
            run.flush()
        if run.refused is not None:
            report.held[integration] = run.refused
        return True


class _BatchRun:
    """One claimed batch, run in order; each write under the claim is one statement (``write_claimed``).

    Before each handler runs, one statement stores its start mark with the
    outcomes of the entries finished since the last one (and the note of a
    lapsed run it repeats), so a crash leaves unstored only the outcome of
    the entry whose handler was running. Outcomes of entries that run no
    handler (poison) wait for the next statement, at most FLUSH_EVERY of them.
    """

    def __init__(self, redriver: Redriver, batch: list[DeadLetter], token, lease_s: float, needed_s: float,
                 report: RedriveReport, progress) -> None:
        self.redriver = redriver
        self.batch = batch
        self.token = token
        self.lease_s = lease_s
        self.needed_s = needed_s
        self.lease_until = batch[0].lease_expires_at
        self.report = report
        self.progress = progress
        self.outcomes: list[DeadLetter] = []  # finished, not stored yet
        self.refused: str | None = None

    def run_all(self, integration: str, lapsed: dict[int, str]) -> None:
        for index, entry in enumerate(self.batch):
            if self.redriver.out_of_time():
                self._release(self.batch[index:])
                return
            if not self._hold_lease(self.batch[index:]):
                return
            if entry.claim_token != self.token:  # lost when the lease was renewed
                continue
            noted = entry.pk in lapsed
            if noted and self._lapsed_run_kills(entry, lapsed[entry.pk]):
                continue
            if not self.flush(start=entry, with_state=noted):
                continue
            if not self._run(integration, entry):
                self._release(self.batch[index:])
                return

    def poison_all(self, reason: str) -> None:
        error = error_record({"category": ErrorCategory.VALIDATION.value, "code": "unknown_integration",
                              "message": reason})
        for entry in self.batch:
            entry.poisoned(self.redriver.now(), error, reason=reason, attempted=False)
            self._done(entry)

    # -- one entry ---------------------------------------------------------------

    def _run(self, integration: str, entry: DeadLetter) -> bool:
        """Run the entry's handler through the pipeline; False when the pipeline refused it."""
        now = self.redriver.now
        try:
            handler = get_handler(entry.handler_name)
        except UnknownHandler as exc:
            error = error_record({"category": ErrorCategory.VALIDATION.value, "code": "unknown_handler",
                                  "message": str(exc)})
            entry.poisoned(now(), error, reason=f"unknown handler {entry.handler_name!r}", attempted=False)
            self._done(entry)
            return True
        context = RedriveContext(entry_id=entry.pk, integration=integration, handler=entry.handler_name,
                                 idempotency_key=entry.context_key(), attempt=entry.attempts + 1,
                                 max_redrives=entry.max_redrives)
        started = time.monotonic()
        result = execute(integration, handler.fn, *handler.arguments(entry.payload, context), cache_key=False)
        duration_ms = (time.monotonic() - started) * 1000
        if result.ok:
            entry.succeeded(now(), duration_ms=duration_ms)
        elif result.attempts == 0:  # refused before reaching the upstream (breaker, quota, rate limit, bulkhead...)
            self.refused = f"refused by the pipeline: {result.error.category.value}"
            return False
        elif rejected_payload(result.error):
            entry.poisoned(now(), error_record(result.error), attempted=True,
                           reason=f"payload rejected by the handler: {result.error.message}")
        else:
            delay = backoff_delay_s(entry.attempts + 1, self.redriver.rng, result.error.retry_after)
            entry.failed(now(), error_record(result.error), duration_ms=duration_ms, retry_in_s=delay)
        self._done(entry)
        return True

    def _lapsed_run_kills(self, entry: DeadLetter, worker: str) -> bool:
        """Note the run a stopped worker left unfinished; True when that makes the entry dead (poison).

        The note is stored with the entry's start mark, before it runs again (or as its outcome).
        """
        error = error_record({"category": ErrorCategory.UNKNOWN.value, "code": "lease_expired",
                              "message": f"worker {worker or '?'} stopped before finishing (its lease expired)"})
        entry.lease_lapsed(self.redriver.now(), error)
        if entry.status != DEAD:
            return False
        self._done(entry)
        return True

    # -- the claim -------------------------------------------------------------

    def _hold_lease(self, remaining: list[DeadLetter]) -> bool:
        """Renew the claim on the rest of the batch when the next run could outlive the lease."""
        now = self.redriver.now()
        if self.lease_until - now >= timedelta(seconds=self.needed_s):
            return True
        self.lease_until = now + timedelta(seconds=self.lease_s)
        held = DeadLetter.objects.filter(pk__in=[e.pk for e in remaining]).renew_lease(self.token, self.lease_until)
        for entry in remaining:
            if entry.pk in held:
                entry.lease_expires_at = self.lease_until  # what a later write of its state keeps
            else:
                entry.claim_token = None
                self.report.lost += 1
        return bool(held)

    def _release(self, remaining: list[DeadLetter]) -> None:
        released = DeadLetter.objects.filter(pk__in=[e.pk for e in remaining]).release(self.token)
        self.report.released += released
        self.redriver.rate_cap.give_back(remaining[0].integration_name, len(remaining))

    # -- writes ----------------------------------------------------------------

    def _done(self, entry: DeadLetter) -> None:
        self.outcomes.append(entry)
        if len(self.outcomes) >= FLUSH_EVERY:
            self.flush()

    def flush(self, start: DeadLetter | None = None, *, with_state: bool = False) -> bool:
        """Store the outcomes waiting, and ``start``'s start mark (and state), in one statement.

        Returns False when ``start`` could not be marked: the claim on it is lost.
        """
        outcomes, self.outcomes = self.outcomes, []
        if not outcomes and start is None:
            return True
        written = DeadLetter.objects.write_claimed(self.token, [*outcomes, start] if with_state else outcomes,
                                                   start=start)
        for entry in outcomes:
            if entry.pk not in written:
                logger.warning("dead letter #%s: claim lost before its outcome (%s) was stored; the next "
                               "owner runs it again", entry.pk, entry.status)
                self.report.lost += 1
            elif entry.status == SUCCEEDED:
                self.report.succeeded += 1
            elif entry.status == DEAD:
                self.report.dead += 1
            else:
                self.report.retrying += 1
            self._tick()
        if start is not None and start.pk not in written:
            logger.warning("dead letter #%s: claim lost before its handler started; the next owner runs it",
                           start.pk)
            self.report.lost += 1
            return False
        return True

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress(1)
