"""The dead letter queue: work a failed call left behind, and what became of it.

An entry is *waiting* while pending (no redrive yet) or retrying (a redrive
failed and the next one is scheduled); it ends succeeded, dead (max_redrives
reached, or a poison entry that can never succeed) or discarded (by an
operator). Nothing waiting is ever deleted: purging takes finished entries only.

A worker owns an entry while it holds its claim: ``claim_token`` set and
``lease_expires_at`` in the future. Every write of a redrive's outcome is
fenced by the token, so a worker whose lease ran out cannot overwrite what
the next owner does. A claim left behind by a crashed worker lapses with its
lease and the entry is claimed again; the interrupted run is noted (not a
redrive spent), and only for the entry whose handler had started.

Behaviour lives here so the admin, the API, the commands and the redrive
call the same methods.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Sequence

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import DatabaseError, connections, models, transaction
from django.db.models import Count, Min, Q
from django.utils import timezone

from integrations.errors import ErrorCategory, ResilienceError
from integrations.resilience.backoff import EQUAL_JITTER, exponential, jittered

from .jsondata import json_payload, json_safe
from .redaction import redact_secrets
from .request import MAX_REDRIVES_LIMIT, check_idempotency_key, check_max_redrives
from .signals import dead_letter_died, redrive_requested
from .conf import dlq_settings

logger = logging.getLogger("integrations.dlq")

PENDING = "pending"
RETRYING = "retrying"
SUCCEEDED = "succeeded"
DEAD = "dead"
DISCARDED = "discarded"
STATUSES = (PENDING, RETRYING, SUCCEEDED, DEAD, DISCARDED)
WAITING = (PENDING, RETRYING)
FINISHED = (SUCCEEDED, DEAD, DISCARDED)

HISTORY_LIMIT = 50  # the first record (enqueued) and the latest ones are kept
MAX_INTERRUPTED_RUNS = 3  # a handler interrupted this often (its worker killed in it) is poison


def error_record(error: ResilienceError | dict | None) -> dict | None:
    """What is stored of an error: category, code, message, retry_after and details, secrets redacted."""
    if error is None:
        return None
    data = error.as_dict() if isinstance(error, ResilienceError) else error
    return json_safe(redact_secrets({
        "category": data.get("category") or ErrorCategory.UNKNOWN.value,
        "code": data.get("code") or "",
        "message": data.get("message") or "",
        "retry_after": data.get("retry_after"),
        "details": data.get("details") or {},
    }))


def backoff_delay_s(attempt: int, rng, retry_after: float | None = None) -> float:
    """Seconds before redrive ``attempt`` + 1: min(base x 2^(attempt-1), max), drawn in [half, full].

    Half-to-full ("equal") jitter spreads a burst of failures out without ever
    coming back at once; a Retry-After from the upstream is a floor (capped at max).
    """
    ceiling = dlq_settings.BACKOFF_MAX_MS / 1000
    delay = jittered(exponential(attempt, dlq_settings.BACKOFF_BASE_MS / 1000, 2, ceiling), rng, EQUAL_JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, ceiling))
    return delay


class DeadLetterQuerySet(models.QuerySet):
    # -- what is where ---------------------------------------------------------

    def waiting(self) -> DeadLetterQuerySet:
        return self.filter(status__in=WAITING)

    def finished(self) -> DeadLetterQuerySet:
        return self.filter(status__in=FINISHED)

    def unclaimed(self, now: datetime) -> DeadLetterQuerySet:
        """Not held by a worker: never claimed, released, or its lease has lapsed."""
        return self.filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lte=now))

    def claimable(self, now: datetime, due_by: datetime | None = None) -> DeadLetterQuerySet:
        """Waiting, unclaimed at ``now``, and due by ``due_by`` (default: now)."""
        return self.waiting().unclaimed(now).filter(next_attempt_at__lte=due_by or now)

    def stats(self, now: datetime | None = None) -> dict:
        now = now or timezone.now()
        by_status = dict.fromkeys(STATUSES, 0)
        by_integration: dict[str, dict[str, int]] = {}
        for row in self.order_by().values("integration_name", "status").annotate(n=Count("pk")):
            by_status[row["status"]] += row["n"]
            by_integration.setdefault(row["integration_name"], dict.fromkeys(STATUSES, 0))[row["status"]] = row["n"]
        waiting = self.waiting()
        first = waiting.aggregate(oldest=Min("created_at"), next=Min("next_attempt_at"))
        return {
            "total": sum(by_status.values()),
            "by_status": by_status,
            "waiting": by_status[PENDING] + by_status[RETRYING],
            "due": waiting.filter(next_attempt_at__lte=now).count(),
            "oldest_waiting_at": _iso(first["oldest"]),
            "next_attempt_at": _iso(first["next"]),
            "by_integration": dict(sorted(by_integration.items())),
        }

    # -- choosing entries (the API and the commands validate the same way) -----

    def with_ids(self, ids) -> DeadLetterQuerySet:
        """The entries with these ids; LookupError naming those that do not exist."""
        ids = set(ids)
        missing = sorted(ids - set(self.filter(pk__in=ids).values_list("pk", flat=True)))
        if missing:
            raise LookupError(f"no dead letter with id {', '.join(map(str, missing))}")
        return self.filter(pk__in=ids)

    def check_retryable(self) -> DeadLetterQuerySet:
        """These entries, when each is waiting or dead; ValueError naming those finished otherwise."""
        done = sorted(self.filter(status__in=(SUCCEEDED, DISCARDED)).values_list("pk", flat=True))
        if done:
            raise ValueError(f"{_ids(done)} succeeded or were discarded: only waiting and dead entries "
                             f"can be retried")
        return self

    # -- the redrive's claim ---------------------------------------------------

    def claim(self, integration: str, limit: int, *, token, worker: str, now: datetime, due_by: datetime,
              lease_until: datetime) -> tuple[list[DeadLetter], dict[int, str]]:
        """Take up to ``limit`` claimable entries of ``integration`` for this worker, atomically.

        Where the database can (PostgreSQL), candidates are locked with
        SELECT ... FOR UPDATE SKIP LOCKED, so concurrent workers pick disjoint
        rows without waiting; elsewhere (SQLite) the UPDATE itself re-checks
        that each row is still claimable, and a row another worker took in
        between is simply not ours. Returns the claimed entries, and for those
        whose previous claim had lapsed (a worker stopped mid-run) that worker
        by id.
        """
        candidates = (self.claimable(now, due_by).filter(integration_name=integration)
                      .order_by("next_attempt_at", "pk"))
        skip_locked = connections[self.db].features.has_select_for_update_skip_locked
        # Without row locks, no transaction either: on SQLite a read that turns into a write
        # inside one fails at once ("database is locked") when another process writes.
        with transaction.atomic(using=self.db) if skip_locked else contextlib.nullcontext():
            if skip_locked:
                candidates = candidates.select_for_update(skip_locked=True)
            picked = list(candidates.values_list("pk", "claim_token", "claimed_by", "started_token")[:limit])
            if not picked:
                return [], {}
            (self.model.objects.using(self.db).claimable(now, due_by)
             .filter(pk__in=[pk for pk, _, _, _ in picked])
             .update(claim_token=token, claimed_by=worker, lease_expires_at=lease_until, updated_at=now))
        entries = list(self.model.objects.using(self.db).filter(claim_token=token).order_by("next_attempt_at", "pk"))
        # Only an entry whose handler had started under the lapsed claim ran: the rest of a stopped
        # worker's batch was never touched and is simply run now, without charging it a redrive.
        lapsed = {pk: holder for pk, previous, holder, started in picked
                  if previous is not None and started == previous}
        return entries, lapsed

    def write_claimed(self, token, entries: Sequence[DeadLetter] = (), *,
                      start: DeadLetter | None = None) -> set[int]:
        """Under this worker's claim, in one statement: the state of ``entries`` and the start of ``start``.

        The state is STATE_FIELDS as they are in memory (a redrive's outcome,
        or the note of an interrupted run); the start mark records, before
        its handler runs, that ``start`` runs under this claim, so if the
        worker then stops, the next claim charges this entry the unfinished
        run, and only this one of the worker's batch. ``start`` may be one of
        ``entries`` too. Only rows still claimed with ``token`` are written;
        returns their ids. A dead entry written is announced after commit.
        """
        entries = list(entries)
        ids = [entry.pk for entry in entries]
        if start is not None and start.pk not in ids:
            ids.append(start.pk)
        if not ids:
            return set()
        self._for_write = True
        connection = connections[self.db]
        meta = self.model._meta
        token_value = meta.get_field("claim_token").get_db_prep_value(token, connection)
        params = [] if start is None else [start.pk, token_value]
        for field in (meta.get_field(name) for name in self.model.STATE_FIELDS):
            for entry in entries:
                params += [entry.pk, field.get_db_prep_save(getattr(entry, field.attname), connection)]
        params += [*ids, token_value]
        with connection.cursor() as cursor:
            cursor.execute(_claimed_write_sql(connection, len(entries), start is not None, len(ids)), params)
            written = {pk for pk, in cursor.fetchall()}
        if start is not None and start.pk in written:
            start.started_token = token
        for entry in entries:
            if entry.status == DEAD and entry.pk in written:
                transaction.on_commit(entry.announce_death, using=self.db)
        return written

    def renew_lease(self, token, lease_until: datetime) -> set[int]:
        """Extend this worker's claim on these entries; returns the ids it still holds."""
        mine = self.filter(claim_token=token)
        mine.update(lease_expires_at=lease_until)
        return set(mine.values_list("pk", flat=True))

    def release(self, token) -> int:
        """Give these entries back unchanged (the pipeline refused them: nothing was attempted)."""
        return self.filter(claim_token=token).update(claim_token=None, lease_expires_at=None,
                                                     updated_at=timezone.now())

    # -- operators' actions (admin, API, commands) ------------------------------

    def retry_now(self, by: str | None = None, *, ask_cluster: bool = True) -> int:
        """Make waiting entries due now and requeue dead ones; returns how many will be redriven.

        With ``ask_cluster`` a redrive task is queued for the django-q cluster
        once this commits; ``manage.py dlq retry`` runs the redrive itself
        instead. Health gate and rate cap still apply: "now" means as soon as
        the integration can take them.
        """
        now = timezone.now()
        with transaction.atomic(using=self.db):
            made_due = self.waiting().update(next_attempt_at=now, updated_at=now)
            requeued = self.filter(status=DEAD).requeue(by)
        if ask_cluster and (made_due or requeued):
            transaction.on_commit(partial(redrive_requested.send, sender=DeadLetter), using=self.db)
        return made_due + requeued

    def requeue(self, by: str | None = None) -> int:
        """Dead entries back to pending, due now, with a fresh allowance of redrives."""
        return self._act("requeued", by, self.filter(status=DEAD), status=PENDING, attempts=0, finished_at=None,
                         next_attempt_at=timezone.now())

    def discard(self, by: str | None = None) -> int:
        """Waiting and dead entries are given up on by an operator: they will not be redriven."""
        now = timezone.now()
        return self._act("discarded", by, self.filter(status__in=(*WAITING, DEAD)), status=DISCARDED,
                         finished_at=now)

    def purge(self) -> int:
        """Delete finished entries; waiting ones are never deleted (discard them first)."""
        deleted, _ = self.finished().delete()
        return deleted

    def _act(self, outcome: str, by: str | None, queryset: DeadLetterQuerySet, **changes) -> int:
        # Entries a worker holds right now are left alone: its outcome is about to be stored.
        now = timezone.now()
        done = 0
        with transaction.atomic(using=self.db):
            for entry in queryset.unclaimed(now).select_for_update():
                for field, value in changes.items():
                    setattr(entry, field, value)
                entry.claim_token = None
                entry.lease_expires_at = None
                entry.note(now, outcome, by=by or "")
                entry.save(update_fields=[*changes, "claim_token", "lease_expires_at", "history", "updated_at"])
                done += 1
        return done


class DeadLetter(models.Model):
    """One piece of work a failed call left to be redriven: its handler, its payload, its fate."""

    STATUS_CHOICES = [(status, status) for status in STATUSES]

    integration_name = models.CharField("integration", max_length=100,
                                        help_text="The integration whose pipeline every redrive goes through.")
    handler_name = models.CharField("handler", max_length=200, db_index=True)
    payload = models.JSONField()
    idempotency_key = models.CharField(max_length=255, unique=True, null=True, blank=True,
                                       help_text="Enqueueing the same key again keeps this one entry.")
    status = models.CharField(max_length=10, choices=STATUS_CHOICES, default=PENDING)
    attempts = models.PositiveIntegerField(default=0, help_text="Redrives made since it was (re)queued.")
    max_redrives = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(MAX_REDRIVES_LIMIT)])
    next_attempt_at = models.DateTimeField()
    # The claim: who holds the entry, until when.
    claim_token = models.UUIDField(null=True, blank=True, db_index=True, editable=False)
    started_token = models.UUIDField(null=True, blank=True, editable=False,
                                     help_text="The claim under which the handler last started.")
    claimed_by = models.CharField(max_length=100, blank=True, help_text="The last worker (host:pid) to claim it.")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    # The last error, its category apart so the admin can filter on it.
    last_error_category = models.CharField("error category", max_length=20, blank=True, db_index=True)
    last_error_code = models.CharField(max_length=100, blank=True)
    last_error_message = models.TextField(blank=True)
    last_error_details = models.JSONField(default=dict, blank=True)
    history = models.JSONField(default=list, blank=True,
                               help_text="Enqueueing, every attempt with its error, and operators' actions.")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = DeadLetterQuerySet.as_manager()

    # What a redrive's outcome changes, written at once under the claim.
    STATE_FIELDS = ("status", "attempts", "next_attempt_at", "claim_token", "lease_expires_at", "last_attempt_at",
                    "last_error_category", "last_error_code", "last_error_message", "last_error_details",
                    "history", "finished_at", "updated_at")

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="dlq_due"),
            models.Index(fields=["integration_name", "status"], name="dlq_integration_status"),
        ]
        verbose_name = "dead letter"

    def __str__(self) -> str:
        return f"#{self.pk} {self.integration_name}/{self.handler_name} ({self.status})"

    # -- enqueueing ------------------------------------------------------------

    @classmethod
    def enqueue(cls, integration: str, handler: str, payload: Any, *, error: ResilienceError | dict | None = None,
                attempts: int = 0, idempotency_key: str | None = None,
                max_redrives: int | None = None) -> tuple[DeadLetter, bool]:
        """Store a piece of work; returns (entry, created).

        With an ``idempotency_key`` already in the queue, the existing entry is
        returned unchanged (created False), whatever its status. ``attempts``
        is how many attempts the original call made. The arguments are those
        logged when a dead letter could not be stored, so
        ``DeadLetter.enqueue(**logged)`` recovers it.
        """
        now = timezone.now()
        record = error_record(error)
        entry = cls(
            integration_name=integration, handler_name=handler, payload=json_payload(payload),
            idempotency_key=check_idempotency_key(idempotency_key),
            max_redrives=check_max_redrives(max_redrives) or dlq_settings.MAX_REDRIVES,
            status=PENDING, attempts=0, created_at=now, updated_at=now,
        )
        entry.next_attempt_at = now + timedelta(seconds=backoff_delay_s(1, random))
        entry._set_error(record)
        entry.note(now, "enqueued", call_attempts=attempts, error=record)
        # A savepoint: a failed insert must not break the caller's transaction.
        with transaction.atomic():
            if entry.idempotency_key is None:
                entry.save(force_insert=True)
                return entry, True
            fields = {f.attname: getattr(entry, f.attname) for f in cls._meta.concrete_fields if not f.primary_key}
            key = fields.pop("idempotency_key")
            return cls.objects.get_or_create(idempotency_key=key, defaults=fields)

    # -- a redrive's outcome (in memory; the redrive stores it under its claim) --

    def context_key(self) -> str:
        return self.idempotency_key or f"dead-letter-{self.pk}"

    def succeeded(self, now: datetime, *, duration_ms: float) -> None:
        self._count_attempt(now)
        self._finish(now, SUCCEEDED)
        self.note(now, SUCCEEDED, attempt=self.attempts, duration_ms=round(duration_ms, 3), worker=self.claimed_by)

    def failed(self, now: datetime, error: dict, *, duration_ms: float | None, retry_in_s: float) -> None:
        """A failed redrive: the next one in ``retry_in_s``, or dead once max_redrives are spent."""
        self._count_attempt(now)
        self._set_error(error)
        self.note(now, "failed", attempt=self.attempts, error=error,
                  duration_ms=None if duration_ms is None else round(duration_ms, 3), worker=self.claimed_by)
        if self.attempts >= self.max_redrives:
            self.died(now, f"max_redrives ({self.max_redrives}) reached")
        else:
            self.status = RETRYING
            self.next_attempt_at = now + timedelta(seconds=retry_in_s)
            self._release()

    def lease_lapsed(self, now: datetime, error: dict) -> None:
        """The previous worker stopped in this entry's handler (killed, or past its lease): run it again now.

        A crash leaves the entry to be retried: the interrupted run is noted,
        not counted as a redrive. An entry whose handler was interrupted
        MAX_INTERRUPTED_RUNS times is poison (it may be what stops its
        worker): dead, with the reason.
        """
        self._set_error(error)
        self.note(now, "interrupted", error=error, worker=self.claimed_by)
        interrupted = sum(1 for record in self.history if record.get("outcome") == "interrupted")
        if interrupted >= MAX_INTERRUPTED_RUNS:
            self.died(now, f"its handler was interrupted {interrupted} times: it may be stopping its worker")

    def poisoned(self, now: datetime, error: dict, *, reason: str, attempted: bool) -> None:
        """An entry that can never succeed (unknown handler, payload rejected): dead at once."""
        if attempted:
            self._count_attempt(now)
        self._set_error(error)
        self.note(now, "poison", attempt=self.attempts if attempted else None, error=error, worker=self.claimed_by)
        self.died(now, reason)

    def died(self, now: datetime, reason: str) -> None:
        self._finish(now, DEAD)
        self.note(now, DEAD, reason=reason)

    def announce_death(self) -> None:
        """Tell monitoring an entry is dead: an ERROR log line and the ``dead_letter_died`` signal."""
        reason = self.history[-1].get("reason", "") if self.history else ""
        logger.error("dead letter #%s of %s (handler %s) is dead after %s redrive(s): %s. Last error: %s: %s",
                     self.pk, self.integration_name, self.handler_name, self.attempts, reason,
                     self.last_error_category, self.last_error_message)
        dead_letter_died.send(sender=type(self), entry=self, reason=reason)

    # -- internals -------------------------------------------------------------

    def note(self, now: datetime, outcome: str, **data) -> None:
        record = {"at": now.isoformat(), "outcome": outcome,
                  **{key: value for key, value in data.items() if value is not None and value != ""}}
        history = [*self.history, record]
        if len(history) > HISTORY_LIMIT:
            history = history[:1] + history[-(HISTORY_LIMIT - 1):]
        self.history = history
        self.updated_at = now

    def _count_attempt(self, now: datetime) -> None:
        self.attempts += 1
        self.last_attempt_at = now

    def _set_error(self, record: dict | None) -> None:
        record = record or {}
        self.last_error_category = record.get("category", "")
        self.last_error_code = record.get("code", "")[:100]
        self.last_error_message = record.get("message", "")
        self.last_error_details = record.get("details", {})

    def _finish(self, now: datetime, status: str) -> None:
        self.status = status
        self.finished_at = now
        self._release()

    def _release(self) -> None:
        self.claim_token = None
        self.lease_expires_at = None

    # -- views -----------------------------------------------------------------

    @property
    def last_error(self) -> dict | None:
        if not self.last_error_category:
            return None
        return {"category": self.last_error_category, "code": self.last_error_code,
                "message": self.last_error_message, "details": self.last_error_details}

    def as_dict(self) -> dict:
        """JSON-ready, for the API and ``manage.py dlq peek``."""
        return {
            "id": self.pk,
            "integration": self.integration_name,
            "handler": self.handler_name,
            "status": self.status,
            "payload": self.payload,
            "idempotency_key": self.idempotency_key,
            "attempts": self.attempts,
            "max_redrives": self.max_redrives,
            "next_attempt_at": _iso(self.next_attempt_at) if self.status in WAITING else None,
            "claimed_by": self.claimed_by or None,
            "lease_expires_at": _iso(self.lease_expires_at),
            "last_attempt_at": _iso(self.last_attempt_at),
            "last_error": self.last_error,
            "history": self.history,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "finished_at": _iso(self.finished_at),
        }


def check_purgeable(status: str) -> str:
    """A status whose entries may be purged; ValueError otherwise (nothing waiting is ever deleted)."""
    if status not in FINISHED:
        raise ValueError(f"{status!r} cannot be purged: only finished entries ({', '.join(FINISHED)}) can; "
                         f"discard waiting entries first")
    return status


def _ids(ids: list[int]) -> str:
    shown = ", ".join(f"#{pk}" for pk in ids[:20])
    return f"entries {shown}{' ...' if len(ids) > 20 else ''}"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()



def _claimed_write_sql(connection, states: int, start: bool, rows: int) -> str:
    """The statement of ``write_claimed``: one UPDATE ... RETURNING, on PostgreSQL or SQLite (3.35 or later)."""
    if connection.vendor == "sqlite" and connection.Database.sqlite_version_info < (3, 35):
        raise DatabaseError(f"the redrive's writes need SQLite 3.35 or later (UPDATE ... RETURNING), "
                            f"not {connection.Database.sqlite_version}")
    if connection.vendor not in ("postgresql", "sqlite"):
        raise DatabaseError(f"the redrive's writes need UPDATE ... RETURNING: supported on postgresql "
                            f"and sqlite, not {connection.vendor}")
    return _claimed_write_sql_for(connection.alias, states, start, rows)


@functools.lru_cache(maxsize=1024)
def _claimed_write_sql_for(alias: str, states: int, start: bool, rows: int) -> str:
    """SET the start mark of one row and STATE_FIELDS of ``states`` rows, by id; fenced by the claim token.

    Parameters: (start id, token) when ``start``; (id, value) per state row,
    field by field; the ``rows`` ids; the token. Values are cast to their
    columns' types on PostgreSQL (SQLite needs no casts, and casting to a
    declared type there may change the value). The rows are found by primary
    key, the token compared on each: through the claim_token index, which
    keeps every row the claim ever held, a write of one row would read the
    whole batch.
    """
    connection = connections[alias]
    qn = connection.ops.quote_name
    meta = DeadLetter._meta
    pk = qn(meta.pk.column)
    claim = meta.get_field("claim_token")

    def typed(field) -> str:
        return f"CAST(%s AS {field.db_type(connection)})" if connection.vendor == "postgresql" else "%s"

    def case(field, whens: str) -> str:
        return f"{qn(field.column)} = CASE {pk} {whens} ELSE {qn(field.column)} END"

    sets = [case(meta.get_field("started_token"), f"WHEN %s THEN {typed(claim)}")] if start else []
    for name in DeadLetter.STATE_FIELDS if states else ():
        field = meta.get_field(name)
        sets.append(case(field, " ".join([f"WHEN %s THEN {typed(field)}"] * states)))
    return (f"UPDATE {qn(meta.db_table)} SET {', '.join(sets)} "
            f"WHERE {pk} IN ({', '.join(['%s'] * rows)}) AND ({qn(claim.column)} = {typed(claim)}) IS TRUE "
            f"RETURNING {pk}")
