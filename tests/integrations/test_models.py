"""The Integration model: presets, validation, the policy it hands the engine, operator actions."""

import pytest
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import transaction

from integrations.errors import ErrorCategory, ResilienceError
from integrations.models import Integration
from integrations.resilience import Fallback, execute, get_engine, set_engine
from integrations.resilience.policy import KIND_PRESETS, KINDS, KNOB_NAMES, Policy


def failing(category=ErrorCategory.SERVER_ERROR):
    def operation():
        operation.calls += 1
        raise ResilienceError(category, "upstream said no")

    operation.calls = 0
    return operation


def counting(value="live"):
    def operation():
        operation.calls += 1
        return value

    operation.calls = 0
    return operation


def quick(name="svc", **knobs):
    """A saved integration whose retries do not slow the suite."""
    knobs = {"base_delay_ms": 1, "max_delay_ms": 5, "jitter": False, **knobs}
    return Integration.objects.create(name=name, **knobs)


# -- presets ---------------------------------------------------------------------------

ISSUE_PRESETS = {
    "database": {"max_retries": 3, "backoff_multiplier": 2.0, "jitter": True, "failure_threshold": 5,
                 "success_threshold": 2, "timeout_ms": 30_000},
    "ai_service": {"max_retries": 3, "backoff_multiplier": 1.5, "failure_threshold": 3, "timeout_ms": 60_000},
    "market_data": {"max_retries": 2, "failure_threshold": 10, "success_threshold": 5, "timeout_ms": 10_000},
    "cache": {"max_retries": 1, "failure_threshold": 20, "success_threshold": 10, "timeout_ms": 5_000},
}


@pytest.mark.parametrize("kind", sorted(ISSUE_PRESETS))
def test_a_new_integration_takes_the_knobs_of_its_kind_as_the_issue_specifies(kind):
    row = Integration(name="svc", kind=kind)

    assert {knob: getattr(row, knob) for knob in ISSUE_PRESETS[kind]} == ISSUE_PRESETS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_integration_takes_every_knob_of_its_kind_preset(kind):
    row = Integration(name="svc", kind=kind)

    assert {knob: getattr(row, knob) for knob in KNOB_NAMES} == KIND_PRESETS[kind]


def test_a_new_integration_without_a_kind_is_an_external_api():
    row = Integration(name="svc")

    assert row.kind == "external_api"
    assert {knob: getattr(row, knob) for knob in KNOB_NAMES} == KIND_PRESETS["external_api"]


def test_explicit_knobs_override_the_preset():
    row = Integration(name="svc", kind="database", max_retries=0, timeout_ms=1_234)

    assert row.max_retries == 0
    assert row.timeout_ms == 1_234
    assert row.failure_threshold == KIND_PRESETS["database"]["failure_threshold"]


@pytest.mark.django_db
def test_a_saved_integration_is_loaded_with_its_stored_knobs():
    Integration.objects.create(name="svc", kind="database", failure_threshold=42)

    assert Integration.objects.get(name="svc").failure_threshold == 42


@pytest.mark.django_db
def test_a_row_loaded_from_the_database_is_not_re_preset_from_its_kind():
    Integration.objects.create(name="svc", kind="database")
    Integration.objects.filter(name="svc").update(kind="cache")

    row = Integration.objects.get(name="svc")

    assert row.kind == "cache"
    assert row.failure_threshold == KIND_PRESETS["database"]["failure_threshold"]
    assert row.timeout_ms == KIND_PRESETS["database"]["timeout_ms"]


def test_apply_preset_sets_every_knob_to_the_new_kind():
    row = Integration(name="svc", kind="database", max_retries=0)

    row.apply_preset("cache")

    assert row.kind == "cache"
    assert {knob: getattr(row, knob) for knob in KNOB_NAMES} == KIND_PRESETS["cache"]


# -- validation --------------------------------------------------------------------------


def assert_invalid(row, field):
    with pytest.raises(ValidationError) as caught:
        row.full_clean()
    assert field in caught.value.message_dict, caught.value.message_dict


@pytest.mark.django_db
def test_a_preset_integration_is_valid():
    Integration(name="billing").full_clean()


@pytest.mark.django_db
@pytest.mark.parametrize("field, value", [
    ("failure_threshold", 0),
    ("success_threshold", 0),
    ("window_size", 0),
    ("half_open_max_calls", 0),
    ("reset_timeout_s", 0),
    ("reset_timeout_s", -1.0),
    ("failure_rate_threshold", 101),
    ("failure_rate_threshold", -1),
    ("slow_call_rate_threshold", 150),
    ("retry_budget_percent", 120),
    ("capacity", 0),
    ("capacity", 1.5),
    ("capacity", -0.5),
    ("backoff_multiplier", 0.5),
    ("max_retries", 21),
    ("attempt_timeout_ms", 0),
    ("timeout_ms", 0),
    ("max_concurrent", 0),
])
def test_full_clean_names_the_field_of_an_out_of_range_knob(field, value):
    assert_invalid(Integration(name="svc", **{field: value}), field)


@pytest.mark.django_db
@pytest.mark.parametrize("capacity", [0.5, 1, 0.01])
def test_a_capacity_in_zero_to_one_is_valid(capacity):
    Integration(name="svc", capacity=capacity).full_clean()


@pytest.mark.django_db
def test_a_blank_retry_budget_is_valid():
    Integration(name="svc", retry_budget_percent=None).full_clean()


@pytest.mark.django_db
def test_full_clean_names_base_delay_ms_when_it_exceeds_max_delay_ms():
    assert_invalid(Integration(name="svc", base_delay_ms=2_000, max_delay_ms=1_000), "base_delay_ms")


@pytest.mark.django_db
def test_full_clean_names_attempt_timeout_ms_when_it_exceeds_timeout_ms():
    assert_invalid(Integration(name="svc", attempt_timeout_ms=6_000, timeout_ms=5_000), "attempt_timeout_ms")


@pytest.mark.django_db
def test_full_clean_names_minimum_calls_when_it_exceeds_window_size():
    assert_invalid(Integration(name="svc", minimum_calls=30, window_size=20), "minimum_calls")


@pytest.mark.django_db
def test_equal_delays_timeouts_and_window_are_valid():
    Integration(name="svc", base_delay_ms=1_000, max_delay_ms=1_000, attempt_timeout_ms=5_000, timeout_ms=5_000,
                minimum_calls=20, window_size=20).full_clean()


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["bad name", "-leading-dash", ".hidden", "slash/name", "colon:name", "café", ""])
def test_full_clean_names_the_name_when_it_has_bad_characters(name):
    assert_invalid(Integration(name=name), "name")


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["billing", "Billing2", "svc.v2_eu-west", "9lives"])
def test_names_of_letters_digits_dots_underscores_and_dashes_are_valid(name):
    Integration(name=name).full_clean()


@pytest.mark.django_db
def test_a_name_can_be_used_only_once():
    Integration.objects.create(name="svc")

    assert_invalid(Integration(name="svc"), "name")


@pytest.mark.django_db
def test_set_mode_refuses_an_unknown_mode():
    row = Integration.objects.create(name="svc")

    with pytest.raises(ValidationError) as caught:
        row.set_mode("sideways")

    assert "mode" in caught.value.message_dict
    row.refresh_from_db()
    assert row.mode == "normal"


# -- the policy ------------------------------------------------------------------------------

EVERY_KNOB = {
    "mode": "metrics_only",
    "failure_threshold": 7,
    "failure_rate_threshold": 33.0,
    "slow_call_rate_threshold": 44.0,
    "slow_call_ms": 1_234,
    "window_type": "time",
    "window_size": 31,
    "window_duration_s": 90,
    "minimum_calls": 11,
    "reset_timeout_s": 12.5,
    "half_open_max_calls": 3,
    "success_threshold": 4,
    "max_retries": 6,
    "base_delay_ms": 111,
    "max_delay_ms": 2_222,
    "backoff_multiplier": 1.7,
    "jitter": False,
    "retry_on": "timeout,unknown",
    "retry_budget_percent": 15.0,
    "hedge_delay_ms": 80,
    "hedge_after_p95": True,
    "attempt_timeout_ms": 3_333,
    "timeout_ms": 44_444,
    "timeout_enforcement": "inline",
    "connect_timeout_ms": 500,
    "read_timeout_ms": 2_000,
    "write_timeout_ms": 1_000,
    "max_concurrent": 9,
    "bulkhead_mode": "adaptive",
    "bulkhead_wait_ms": 55,
    "hourly_limit": 100,
    "daily_limit": 1_000,
    "rate_limit_permits": 50,
    "rate_limit_period_s": 60.0,
    "rate_limit_wait_ms": 250,
    "cache_ttl_s": 66,
    "cache_soft_ttl_s": 33,
    "capacity": 0.75,
}


def test_every_knob_example_covers_every_knob_and_differs_from_the_preset():
    assert set(EVERY_KNOB) == set(KNOB_NAMES)
    assert all(EVERY_KNOB[knob] != KIND_PRESETS["external_api"][knob] for knob in KNOB_NAMES)


@pytest.mark.django_db
def test_to_policy_carries_every_knob_of_a_stored_row():
    Integration.objects.create(name="svc", kind="market_data", **EVERY_KNOB)
    row = Integration.objects.get(name="svc")
    row.clear_cache()

    policy = row.to_policy()

    assert isinstance(policy, Policy)
    assert (policy.name, policy.kind, policy.cache_version) == ("svc", "market_data", 1)
    assert {knob: getattr(policy, knob) for knob in KNOB_NAMES} == EVERY_KNOB


@pytest.mark.django_db
def test_saving_an_integration_refreshes_the_engines_cached_policy(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        row = Integration.objects.create(name="svc", max_retries=3)
    assert get_engine().registry.get("svc").max_retries == 3

    row.max_retries = 1
    with django_capture_on_commit_callbacks(execute=True):
        row.save()

    assert get_engine().registry.get("svc").max_retries == 1


@pytest.mark.django_db(transaction=True)
def test_a_committed_save_refreshes_the_engines_cached_policy_at_once():
    row = Integration.objects.create(name="svc", max_retries=3)
    assert get_engine().registry.get("svc").max_retries == 3

    row.max_retries = 1
    row.save()

    assert get_engine().registry.get("svc").max_retries == 1


@pytest.mark.django_db
def test_a_rolled_back_save_does_not_reach_the_engine(django_capture_on_commit_callbacks):
    row = Integration.objects.create(name="svc", max_retries=3)
    assert get_engine().registry.get("svc").max_retries == 3

    with django_capture_on_commit_callbacks(execute=True):
        with pytest.raises(RuntimeError):
            with transaction.atomic():
                row.max_retries = 1
                row.save()
                raise RuntimeError("abandon the edit")

    assert get_engine().registry.get("svc").max_retries == 3


@pytest.mark.django_db
def test_deleting_an_integration_makes_its_name_unknown_to_the_engine(django_capture_on_commit_callbacks):
    row = Integration.objects.create(name="svc")
    assert execute("svc", counting()).ok

    with django_capture_on_commit_callbacks(execute=True):
        row.delete()

    with pytest.raises(ImproperlyConfigured, match="svc"):
        execute("svc", counting())


@pytest.mark.django_db
def test_a_guarded_call_makes_no_query_once_the_policy_is_loaded(django_assert_num_queries):
    quick(max_retries=2, cache_ttl_s=60)
    execute("svc", counting(), cache_key="warm-up")

    with django_assert_num_queries(0):
        served = execute("svc", counting(), cache_key="k")
        failed = execute("svc", failing(), cache_key="other")
        cached = execute("svc", counting(), cache_key="k")

    assert served.ok and served.source == "live"
    assert not failed.ok and failed.attempts == 3
    assert cached.ok and cached.source == "cache"


# -- auto-registration ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_auto_registration_creates_an_external_api_integration_for_an_unknown_name(settings):
    settings.RESILIENCE_AUTO_REGISTER = True
    set_engine(None)

    result = execute("brand-new", counting(42))

    assert result.ok and result.value == 42
    row = Integration.objects.get(name="brand-new")
    assert row.kind == "external_api"
    assert {knob: getattr(row, knob) for knob in KNOB_NAMES} == KIND_PRESETS["external_api"]


@pytest.mark.django_db
def test_without_auto_registration_an_unknown_name_raises_improperly_configured_naming_it(settings):
    settings.RESILIENCE_AUTO_REGISTER = False
    set_engine(None)
    operation = counting()

    with pytest.raises(ImproperlyConfigured, match="brand-new"):
        execute("brand-new", operation)

    assert operation.calls == 0
    assert not Integration.objects.filter(name="brand-new").exists()


# -- operator actions ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_force_open_refuses_the_next_call_without_invoking_it(django_capture_on_commit_callbacks):
    row = quick()
    assert execute("svc", counting()).ok  # the engine holds the normal-mode policy
    operation = counting()

    with django_capture_on_commit_callbacks(execute=True):
        row.force_open()
    result = execute("svc", operation)

    assert Integration.objects.get(name="svc").mode == "forced_open"
    assert not result.ok
    assert result.error.category is ErrorCategory.CIRCUIT_OPEN
    assert result.attempts == 0
    assert operation.calls == 0


@pytest.mark.django_db
def test_force_closed_lets_calls_through_after_many_failures(django_capture_on_commit_callbacks):
    row = quick(max_retries=0, failure_threshold=2)
    with django_capture_on_commit_callbacks(execute=True):
        row.force_closed()
    for _ in range(10):
        execute("svc", failing())
    operation = counting()

    result = execute("svc", operation)

    assert Integration.objects.get(name="svc").mode == "forced_closed"
    assert result.ok
    assert operation.calls == 1


@pytest.mark.django_db
def test_reset_breaker_closes_an_open_breaker():
    row = quick(max_retries=0, failure_threshold=2, reset_timeout_s=60)
    for _ in range(2):
        execute("svc", failing())
    assert execute("svc", counting()).error.category is ErrorCategory.CIRCUIT_OPEN
    operation = counting()

    row.reset_breaker(by="operator")
    result = execute("svc", operation)

    assert result.ok
    assert operation.calls == 1
    assert get_engine().breaker("svc").state == "closed"


@pytest.mark.django_db
def test_reset_breaker_brings_a_forced_open_integration_back_to_normal(django_capture_on_commit_callbacks):
    row = quick()
    with django_capture_on_commit_callbacks(execute=True):
        row.force_open()
    assert execute("svc", counting()).error.category is ErrorCategory.CIRCUIT_OPEN

    with django_capture_on_commit_callbacks(execute=True):
        row.reset_breaker()
    result = execute("svc", counting())

    assert Integration.objects.get(name="svc").mode == "normal"
    assert result.ok


@pytest.mark.django_db
def test_clear_cache_makes_a_cached_value_unreachable(django_capture_on_commit_callbacks):
    row = quick(cache_ttl_s=60)
    first = counting("first")
    assert execute("svc", first, cache_key="k").value == "first"
    assert execute("svc", counting("second"), cache_key="k").source == "cache"

    with django_capture_on_commit_callbacks(execute=True):
        row.clear_cache()
    after = counting("third")
    result = execute("svc", after, cache_key="k")

    assert result.source == "live"
    assert result.value == "third"
    assert after.calls == 1


@pytest.mark.django_db
def test_clear_cache_makes_a_last_known_value_unreachable(django_capture_on_commit_callbacks):
    row = quick(max_retries=0)
    assert execute("svc", counting("good"), cache_key="k", fallbacks=(Fallback.last_known(),)).ok

    with django_capture_on_commit_callbacks(execute=True):
        row.clear_cache()
    result = execute("svc", failing(), cache_key="k", fallbacks=(Fallback.last_known(),))

    assert not result.ok
    assert result.error.category is ErrorCategory.SERVER_ERROR


@pytest.mark.django_db
def test_clear_cache_from_a_stale_instance_still_makes_the_cached_value_unreachable(
        django_capture_on_commit_callbacks):
    quick(cache_ttl_s=60)
    first_reader = Integration.objects.get(name="svc")
    second_reader = Integration.objects.get(name="svc")
    with django_capture_on_commit_callbacks(execute=True):
        first_reader.clear_cache()
    assert execute("svc", counting("old"), cache_key="k").value == "old"

    with django_capture_on_commit_callbacks(execute=True):
        second_reader.clear_cache()
    result = execute("svc", counting("new"), cache_key="k")

    assert result.value == "new"


@pytest.mark.django_db
def test_a_partial_save_from_a_stale_instance_pushes_the_committed_policy(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        Integration.objects.create(name="stale", max_retries=3)
    a = Integration.objects.get(name="stale")
    b = Integration.objects.get(name="stale")
    with django_capture_on_commit_callbacks(execute=True):
        b.max_retries = 0
        b.save()
    with django_capture_on_commit_callbacks(execute=True):
        a.force_open()  # saves only mode, from an instance that still says max_retries=3
    policy = get_engine().registry.get("stale")
    assert (policy.mode, policy.max_retries) == ("forced_open", 0)
