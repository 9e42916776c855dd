"""A failed call with dead_letter=... is stored as a DeadLetter row, and never lost silently."""

import asyncio
import json
import logging

import pytest
from django.db import OperationalError, connection, transaction

import dlq_test_handlers  # noqa: F401 - registers the dlq_test.* handlers
from integrations.dlq import DeadLetter as DeadLetterRequest
from integrations.dlq import subscriber
from integrations.dlq.models import DeadLetter
from integrations.errors import ErrorCategory, ResilienceError
from integrations.resilience import aexecute, execute
from integrations.resilience.events import DeadLetterRequested


@pytest.fixture
def svc(make_engine, bus):
    bus.subscribe(DeadLetterRequested, subscriber.on_dead_letter_requested)
    return make_engine("svc", max_retries=2, base_delay_ms=1, max_delay_ms=1)


def down():
    raise ConnectionError("billing is down")


def secretive():
    raise ResilienceError(ErrorCategory.SERVER_ERROR, "GET /charge?token=abc returned 500",
                          headers={"Authorization": "Bearer abc"}, status=500)


@pytest.mark.django_db
def test_a_failed_call_stores_its_work_with_its_error_and_attempts(svc):
    result = execute("svc", down, dead_letter=DeadLetterRequest("dlq_test.noop", {"order": 7}))
    assert not result.ok
    entry = DeadLetter.objects.get()
    assert (entry.integration_name, entry.handler_name, entry.payload, entry.status) == (
        "svc", "dlq_test.noop", {"order": 7}, "pending")
    assert (entry.last_error_category, entry.last_error_message) == ("network", "billing is down")
    assert entry.history[0]["call_attempts"] == 3


@pytest.mark.django_db
def test_a_successful_call_stores_nothing(svc):
    assert execute("svc", lambda: "ok", dead_letter=DeadLetterRequest("dlq_test.noop", {})).ok
    assert not DeadLetter.objects.exists()


@pytest.mark.django_db
def test_secrets_of_the_error_are_not_stored(svc):
    execute("svc", secretive, dead_letter=DeadLetterRequest("dlq_test.noop", {}))
    entry = DeadLetter.objects.get()
    assert entry.last_error_message == "GET /charge?token=[redacted] returned 500"
    assert entry.last_error_details == {"headers": {"Authorization": "[redacted]"}, "status": 500}
    assert "abc" not in json.dumps(entry.history)


@pytest.mark.django_db
def test_the_dead_letter_rolls_back_with_the_callers_transaction(svc):
    class Abandoned(Exception):
        pass

    with pytest.raises(Abandoned), transaction.atomic():
        execute("svc", down, dead_letter=DeadLetterRequest("dlq_test.noop", {"order": 7}))
        raise Abandoned  # the order this dead letter was for is rolled back too
    assert not DeadLetter.objects.exists()


@pytest.mark.django_db
def test_a_dead_letter_that_cannot_be_stored_is_logged_in_full_and_can_be_recovered(svc, monkeypatch, caplog):
    real_enqueue = DeadLetter.enqueue

    def database_down(*args, **kwargs):
        raise OperationalError("the database is down")

    monkeypatch.setattr(DeadLetter, "enqueue", database_down)
    with caplog.at_level(logging.ERROR, logger="integrations.dlq"):
        result = execute("svc", secretive, dead_letter=DeadLetterRequest("dlq_test.noop", {"order": 7}))
    assert not result.ok  # the caller still gets its result
    (record,) = [r for r in caplog.records if "dead letter NOT STORED" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    logged = json.loads(record.getMessage().split("entry=", 1)[1])
    assert logged["payload"] == {"order": 7} and "abc" not in json.dumps(logged)

    entry, created = real_enqueue(**logged)
    assert created and (entry.handler_name, entry.payload, entry.last_error_category) == (
        "dlq_test.noop", {"order": 7}, "server_error")


@pytest.mark.django_db(transaction=True)
def test_a_failed_write_leaves_the_callers_transaction_usable(make_engine, bus):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (set DATABASE_URL)")  # SQLite does not enforce the column's length
    bus.subscribe(DeadLetterRequested, subscriber.on_dead_letter_requested)
    name = "x" * 150  # longer than the column: the insert fails in the database
    make_engine(name, max_retries=0)
    with transaction.atomic():
        execute(name, down, dead_letter=DeadLetterRequest("dlq_test.noop", {}))
        assert DeadLetter.objects.count() == 0  # a query still works: the failure was a savepoint's


@pytest.mark.django_db(transaction=True)
def test_under_an_event_loop_the_row_is_written_off_the_loop(svc):
    async def failing():
        raise ConnectionError("down")

    async def call():
        return await aexecute("svc", failing, dead_letter=DeadLetterRequest("dlq_test.noop", {"order": 7}))

    assert not asyncio.run(call()).ok
    subscriber.wait_for_pending_writes()
    assert DeadLetter.objects.get().payload == {"order": 7}


@pytest.mark.django_db
def test_the_call_sites_idempotency_key_and_max_redrives_reach_the_row(svc):
    for _ in range(2):
        execute("svc", down, dead_letter=DeadLetterRequest("dlq_test.noop", {}, idempotency_key="charge-7",
                                                           max_redrives=2))
    assert list(DeadLetter.objects.values_list("idempotency_key", "max_redrives")) == [("charge-7", 2)]
