"""Dead letters into the queue: the subscriber of the engine's DeadLetterRequested.

The row is written in the caller's thread and transaction, inside a
savepoint: if the caller's transaction rolls back, the work the dead letter
describes was rolled back with it, and so is the dead letter (a
transactional outbox). Under a running event loop (aexecute) the ORM must not
block the loop, so the write goes to a writer thread, as breaker events do.

A write that fails because the database cannot be reached (OperationalError,
InterfaceError: not a refused row) is tried once more on a fresh
connection (the first write after a database restart meets the connection the
restart closed), unless it is part of the caller's transaction. If it still
fails, outside the caller's transaction the entry is spooled to local disk
and stored later by itself (spool.py); inside it, or if spooling fails too, or
for any other error, the entry is logged at ERROR on the ``integrations.dlq``
logger with everything needed to store it again, ``DeadLetter.enqueue(**entry)``
with the logged JSON. Nothing is re-raised: the call it came from has already
finished, and the event bus would only log it again.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from django.db import connection, connections

from integrations.resilience.events import DeadLetterRequested

from . import spool
from .spool import UNREACHABLE, log_not_stored

logger = logging.getLogger("integrations.dlq")

_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dead-letters")


def entry_from(event: DeadLetterRequested) -> dict:
    """The arguments of ``DeadLetter.enqueue`` for the event, secrets of the error redacted."""
    from .models import error_record

    return {
        "integration": event.integration,
        "handler": event.handler,
        "payload": event.payload,
        "error": error_record(event.error),
        "attempts": event.attempts,
        "idempotency_key": event.extra.get("idempotency_key"),
        "max_redrives": event.extra.get("max_redrives"),
    }


def store(entry: dict) -> None:
    from .models import DeadLetter

    try:
        dead_letter, created = _enqueue_retrying_once(DeadLetter, entry)
    except UNREACHABLE as exc:
        if not connection.in_atomic_block and _spooled(entry, exc):
            return
        log_not_stored(entry)
        return
    except Exception:  # noqa: BLE001 - see module docstring: logged in full so it can be recovered
        log_not_stored(entry)
        return
    if not connection.in_atomic_block:
        spool.replay_own()  # the database takes writes again: what this process spooled goes in
    if created:
        logger.info("dead letter #%s stored for %s (handler %s)", dead_letter.pk, entry["integration"],
                    entry["handler"])
    else:
        logger.info("dead letter for %s (handler %s) already queued as #%s (idempotency key %r)",
                    entry["integration"], entry["handler"], dead_letter.pk, entry["idempotency_key"])


def _enqueue_retrying_once(model, entry: dict):
    try:
        return model.enqueue(**entry)
    except UNREACHABLE:
        if connection.in_atomic_block:
            raise  # the caller's transaction is broken: a retry cannot be part of it
        # the connection may be one the server closed (a restart): a fresh one is tried once
        connection.close()
        return model.enqueue(**entry)


def _spooled(entry: dict, exc: Exception) -> bool:
    try:
        path = spool.spool(entry)
    except (OSError, TypeError, ValueError) as spool_error:  # no directory, a full disk, an entry not JSON
        logger.error("dead letter could not be spooled either (%s: %s)", type(spool_error).__name__, spool_error)
        return False
    key = entry.get("idempotency_key")
    logger.warning("dead letter for %s (handler %s%s) spooled to %s: the database could not be reached (%s: %s); "
                   "it is stored when the database is back", entry["integration"], entry["handler"],
                   f", idempotency key {key!r}" if key else "", path, type(exc).__name__, exc)
    return True


def _store_in_thread(entry: dict) -> None:
    try:
        store(entry)
    finally:
        connections.close_all()  # dead letters are rare: hold no connection between them


def on_dead_letter_requested(event: DeadLetterRequested) -> None:
    try:
        entry = entry_from(event)
    except Exception:  # noqa: BLE001 - see module docstring: the event itself is logged so it can be recovered
        logger.error("dead letter NOT STORED (unreadable event): %r", event, exc_info=True)
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        store(entry)  # plain sync caller: in its thread and transaction
        return
    _writer.submit(_store_in_thread, entry)


def wait_for_pending_writes(timeout_s: float = 10.0) -> None:
    """Block until the writer thread has stored what was handed to it (tests, shutdown)."""
    _writer.submit(lambda: None).result(timeout_s)
