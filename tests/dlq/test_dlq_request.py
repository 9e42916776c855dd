"""DeadLetter(...) at the call site: everything wrong with it is refused there, before the call runs."""

from datetime import datetime

import pytest

import dlq_test_handlers  # noqa: F401 - registers the dlq_test.* handlers
from integrations.dlq import DeadLetter
from integrations.dlq.handlers import UnknownHandler
from integrations.resilience import execute


def test_it_keeps_a_json_copy_of_the_payload_and_its_options():
    payload = {"order": 7, "lines": (1, 2)}
    request = DeadLetter("dlq_test.noop", payload, idempotency_key="charge-7", max_redrives=3)
    payload["order"] = 8
    assert (request.handler, request.payload) == ("dlq_test.noop", {"order": 7, "lines": [1, 2]})
    assert request.extra == {"idempotency_key": "charge-7", "max_redrives": 3}


def test_a_payload_that_is_not_json_is_refused_before_the_call_runs(make_engine, upstream):
    make_engine("svc")
    operation = upstream(ConnectionError("down"))
    with pytest.raises(TypeError, match=r"payload\['when'\] is a datetime.datetime, which is not JSON"):
        execute("svc", operation, dead_letter=DeadLetter("dlq_test.noop", {"when": datetime(2026, 1, 1)}))
    assert operation.calls == 0


def test_an_unknown_handler_is_refused_naming_it_and_where_handlers_are_found():
    with pytest.raises(UnknownHandler, match=r"Unknown dead letter handler 'billing\.charge'.*"
                                             r"RESILIENCE_DLQ_HANDLER_MODULES"):
        DeadLetter("billing.charge", {})


@pytest.mark.parametrize("options, error, message", [
    ({"max_redrives": 0}, ValueError, "max_redrives must be between 1 and 1000, got 0"),
    ({"max_redrives": "3"}, TypeError, "max_redrives must be an int"),
    ({"max_redrives": True}, TypeError, "max_redrives must be an int"),
    ({"idempotency_key": ""}, ValueError, "idempotency_key must be 1 to 255 characters"),
    ({"idempotency_key": 7}, TypeError, "idempotency_key must be a str"),
])
def test_bad_options_are_refused_naming_them(options, error, message):
    with pytest.raises(error, match=message):
        DeadLetter("dlq_test.noop", {}, **options)


def test_a_handler_name_must_be_a_string():
    with pytest.raises(TypeError, match="needs a handler name"):
        DeadLetter(dlq_test_handlers.noop, {})
