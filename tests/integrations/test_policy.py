"""The knobs are declared once, on the Policy: its own validation, the model's fields, the admin's
fieldsets and the import command's fields all come from that declaration."""

import pytest
from django.contrib import admin
from django.core.exceptions import ValidationError

from integrations.management.commands.integrations import FIELDS
from integrations.models import Integration
from integrations.resilience.policy import KNOB_GROUPS, KNOBS, KNOBS_BY_GROUP, InvalidPolicy, Policy

OUT_OF_RANGE = [
    ("failure_threshold", 0), ("success_threshold", 0), ("window_size", 0), ("minimum_calls", 0),
    ("half_open_max_calls", 0), ("reset_timeout_s", 0), ("reset_timeout_s", -1.0),
    ("failure_rate_threshold", 101), ("failure_rate_threshold", -1), ("slow_call_rate_threshold", 150),
    ("retry_budget_percent", 120), ("capacity", 0), ("capacity", 1.5), ("backoff_multiplier", 0.5),
    ("max_retries", 21), ("max_retries", -1), ("base_delay_ms", -1), ("attempt_timeout_ms", 0), ("timeout_ms", 0),
    ("max_concurrent", 0), ("bulkhead_wait_ms", -5), ("hourly_limit", 0), ("daily_limit", 0), ("cache_ttl_s", -1),
    ("retry_on", "timeout,circuit_open"), ("retry_on", " , "),
    ("rate_limit_permits", 0), ("rate_limit_period_s", 0), ("rate_limit_period_s", 100_000),
    ("rate_limit_wait_ms", -1), ("window_duration_s", 0), ("window_duration_s", 86_401),
]


@pytest.mark.parametrize("field, value", OUT_OF_RANGE)
def test_a_policy_built_in_code_refuses_an_out_of_range_knob_naming_it(field, value):
    with pytest.raises(InvalidPolicy) as caught:
        Policy("billing", **{field: value})
    assert list(caught.value.errors) == [field]
    assert str(caught.value).startswith(f"invalid policy 'billing': {field}: ")


@pytest.mark.django_db
@pytest.mark.parametrize("field, value", OUT_OF_RANGE)
def test_the_model_tells_an_out_of_range_knob_what_the_policy_tells_it(field, value):
    with pytest.raises(InvalidPolicy) as refused:
        Policy("billing", **{field: value})
    with pytest.raises(ValidationError) as caught:
        Integration(name="billing", **{field: value}).full_clean()
    assert refused.value.errors[field] in caught.value.message_dict[field]


@pytest.mark.parametrize("field, value, expected", [
    ("jitter", "yes", "Expected true or false, got 'yes'."),
    ("jitter", 1, "Expected true or false, got 1."),
    ("max_retries", 2.5, "Expected an integer, got 2.5."),
    ("max_retries", True, "Expected an integer, got True."),
    ("failure_rate_threshold", float("nan"), "Expected a finite number, got nan."),
    ("timeout_ms", None, "This field cannot be null."),
    ("mode", "sometimes", "Unknown value 'sometimes'; expected one of normal, metrics_only, forced_open, "
                          "forced_closed."),
    ("timeout_enforcement", "process", "Unknown value 'process'; expected one of thread, inline."),
    ("window_type", "sliding", "Unknown value 'sliding'; expected one of count, time."),
    ("retry_on", "timeout,bogus", "Unknown value 'bogus'; expected some of timeout, rate_limit, network, "
                                  "server_error, client_error, unknown."),
    ("retry_on", "", "Name at least one category; to retry nothing, set max retries to 0."),
    ("retry_on", 5, "Expected a string, got 5."),
])
def test_a_policy_refuses_a_knob_of_the_wrong_type_or_choice(field, value, expected):
    with pytest.raises(InvalidPolicy) as caught:
        Policy("billing", **{field: value})
    assert caught.value.errors == {field: expected}


TIME_WITHOUT_DURATION = ("A time window needs its duration: the seconds the rates are measured over (or choose "
                         "the count window).")


def test_a_time_window_without_its_duration_is_refused_naming_the_duration():
    with pytest.raises(InvalidPolicy) as caught:
        Policy("billing", window_type="time")
    assert caught.value.errors == {"window_duration_s": TIME_WITHOUT_DURATION}
    assert Policy("billing", window_type="time", window_duration_s=30).time_window_s == 30
    assert Policy("billing", window_duration_s=30).time_window_s == 0  # a count window leaves it unused


@pytest.mark.django_db
def test_the_model_names_the_duration_a_time_window_lacks_and_lets_minimum_calls_pass_window_size():
    with pytest.raises(ValidationError) as caught:
        Integration(name="billing", window_type="time", window_duration_s=None).full_clean()
    assert caught.value.message_dict == {"window_duration_s": [TIME_WITHOUT_DURATION]}
    # a time window's calls are not capped by window_size: more of them may be required
    Integration(name="billing", window_type="time", window_duration_s=60, window_size=20, minimum_calls=50).full_clean()
    with pytest.raises(ValidationError) as caught:
        Integration(name="billing", window_size=20, minimum_calls=50).full_clean()
    assert list(caught.value.message_dict) == ["minimum_calls"]


def test_a_policy_names_every_bad_knob_at_once_and_an_unknown_kind():
    with pytest.raises(InvalidPolicy) as caught:
        Policy("billing", kind="mainframe", window_size=0, capacity=2.0)
    assert set(caught.value.errors) == {"kind", "window_size", "capacity"}
    assert caught.value.errors["capacity"] == "Capacity must be in (0, 1]: a share of calls, 1 meaning all of them."


def test_optional_knobs_take_none_and_the_defaults_are_valid():
    policy = Policy("billing", hourly_limit=None, daily_limit=None, retry_budget_percent=None)
    assert policy.hourly_limit is None and Policy("billing").max_retries == 3
    assert Policy("billing").replace(max_retries=5).max_retries == 5
    with pytest.raises(InvalidPolicy, match="max_retries"):
        Policy("billing").replace(max_retries=50)


def test_every_knob_has_a_model_field_of_its_type_nullable_only_when_optional():
    types = {bool: "BooleanField", int: "PositiveIntegerField", float: "FloatField", str: "CharField"}
    for knob in KNOBS:
        model_field = Integration._meta.get_field(knob.name)
        assert model_field.get_internal_type() == types[knob.type], knob.name
        assert model_field.null is knob.optional, knob.name
        assert model_field.help_text == knob.help
        if knob.many:  # a set of the choices, checked by the knob's own rule
            assert not model_field.choices and any(getattr(v, "name", None) == knob.name
                                                   for v in model_field.validators), knob.name
        elif knob.choices:
            assert tuple(model_field.choices) == knob.choices


def test_the_admin_shows_every_knob_once_in_its_declared_group():
    fieldsets = dict(admin.site.get_model_admin(Integration).fieldsets)
    shown = [name for group in KNOB_GROUPS for name in fieldsets[group]["fields"] if name != "cache_version"]
    assert shown == [knob.name for knob in KNOBS]
    assert all(fieldsets[group]["fields"][:len(KNOBS_BY_GROUP[group])] == KNOBS_BY_GROUP[group]
               for group in KNOB_GROUPS)


def test_the_import_file_accepts_every_knob():
    assert set(FIELDS) == {"name", "kind", "description", *(knob.name for knob in KNOBS)}
