"""Payloads must be plain JSON (refused otherwise, naming the part); error details are kept whatever they hold."""

import math
from decimal import Decimal

import pytest

from integrations.dlq.jsondata import json_payload, json_safe


@pytest.mark.parametrize("payload, error, message", [
    ({"amount": Decimal("9.99")}, TypeError, r"payload\['amount'\] is a decimal.Decimal"),
    ({"tags": {"a", "b"}}, TypeError, r"payload\['tags'\] is a builtins.set"),
    ({"lines": [{"qty": math.nan}]}, ValueError, r"payload\['lines'\]\[0\]\['qty'\] is nan"),
    ({"total": math.inf}, ValueError, "JSON has no NaN or infinity"),
    ({1: "one"}, TypeError, "has the key 1 \\(int\\): JSON object keys are strings"),
    ({"note": "a\x00b"}, ValueError, "NUL character"),
])
def test_what_json_cannot_hold_is_refused_naming_where_it_is(payload, error, message):
    with pytest.raises(error, match=message):
        json_payload(payload)


def test_a_cycle_is_refused():
    payload = {"lines": []}
    payload["lines"].append(payload)
    with pytest.raises(ValueError, match="refers back to itself"):
        json_payload(payload)


def test_a_shared_value_is_not_a_cycle_and_tuples_become_lists():
    shared = {"sku": "A1"}
    assert json_payload({"a": shared, "b": (shared, None, True, 2.5)}) == {
        "a": {"sku": "A1"}, "b": [{"sku": "A1"}, None, True, 2.5]}


def test_details_keep_what_json_cannot_hold_as_text():
    cyclic = []
    cyclic.append(cyclic)
    safe = json_safe({"amount": Decimal("1.5"), 2: math.nan, "deep": cyclic, "nul": "a\x00"})
    assert safe["amount"] == "Decimal('1.5')"
    assert safe["2"] == "nan"
    assert safe["nul"] == "a\\x00"
    assert isinstance(safe["deep"][0][0][0], list)  # cut at MAX_SAFE_DEPTH, not a RecursionError
