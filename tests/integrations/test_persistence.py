"""Breaker transitions are stored as BreakerEvent rows and the BreakerState is kept current."""

import asyncio

import pytest

from integrations.models import BreakerEvent, BreakerState, Integration
from integrations.persistence import _writer
from integrations.resilience import aexecute, execute

pytestmark = pytest.mark.django_db(transaction=True)


def down():
    raise ConnectionError("down")


def test_a_trip_is_stored_once_with_its_reason():
    Integration.objects.create(name="billing", failure_threshold=2, max_retries=0, timeout_enforcement="inline")
    for _ in range(5):
        execute("billing", down)
    event = BreakerEvent.objects.get()
    assert (event.from_state, event.to_state, event.reason, event.by) == ("closed", "open",
                                                                          "2 consecutive failures", "")
    state = BreakerState.objects.get(integration__name="billing")
    assert (state.state, state.transitions) == ("open", 1)
    assert state.opened_at == event.at


def test_a_manual_reset_is_stored_naming_the_operator():
    row = Integration.objects.create(name="billing", failure_threshold=1, max_retries=0,
                                     timeout_enforcement="inline")
    execute("billing", down)
    row.reset_breaker(by="alice")
    last = BreakerEvent.objects.first()
    assert (last.from_state, last.to_state, last.by) == ("open", "closed", "alice")
    assert BreakerState.objects.get(integration=row).state == "closed"


def test_transitions_under_an_event_loop_are_written_off_the_loop():
    Integration.objects.create(name="billing", failure_threshold=1, max_retries=0)

    async def failing():
        raise ConnectionError("down")

    asyncio.run(aexecute("billing", failing))
    _writer.submit(lambda: None).result(5)  # the writer is a single thread: this waits for the write
    assert BreakerEvent.objects.filter(integration__name="billing", to_state="open").count() == 1
