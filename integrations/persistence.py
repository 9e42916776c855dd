"""Breaker transitions into the ORM: BreakerState and BreakerEvent.

Subscribed to the engine's StateTransition events, so rows are written at
transitions only, never per call. Under a running event loop (aexecute) the
write goes to a worker thread, since the ORM must not block the loop.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from django.db import connections, transaction

from .resilience.breaker import OPEN
from .resilience.events import StateTransition

logger = logging.getLogger("integrations.persistence")

_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="breaker-events")


def _when(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=timezone.utc)


def write_transition(transition) -> None:
    from .models import BreakerEvent, BreakerState, Integration

    integration = Integration.objects.filter(name=transition.integration).only("pk").first()
    if integration is None:
        logger.warning("breaker transition of unknown integration %s not stored", transition.integration)
        return
    at = _when(transition.at)
    with transaction.atomic():
        BreakerEvent.objects.create(integration=integration, from_state=transition.from_state,
                                    to_state=transition.to_state, reason=transition.reason[:200], at=at,
                                    by=transition.by or "")
        state, _ = BreakerState.objects.select_for_update().get_or_create(integration=integration)
        state.state = transition.to_state
        state.changed_at = at
        state.last_reason = transition.reason[:200]
        state.transitions += 1
        if transition.to_state == OPEN:
            state.opened_at = at
        state.save()


def _write_in_thread(transition) -> None:
    try:
        write_transition(transition)
    except Exception:  # noqa: BLE001 - a history row lost must not go unnoticed, nor kill the writer thread
        logger.exception("could not store breaker transition %s", transition)
    finally:
        connections.close_all()  # transitions are rare: hold no connection between them


def on_transition(event: StateTransition) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        write_transition(event.transition)  # plain sync caller: write now
        return
    _writer.submit(_write_in_thread, event.transition)
