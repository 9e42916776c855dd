"""integrations.testing: what a host's own suite uses to test code that makes guarded calls."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from integrations.dlq.models import DeadLetter
from integrations.dlq.handlers import dead_letter_handler
from integrations.errors import ErrorCategory
from integrations.models import Integration
from integrations.resilience import Fallback, Policy, execute, get_engine
from integrations.resilience.breaker import HALF_OPEN, OPEN
from integrations.testing import redrive_now, resilience_test_engine


DELIVERED = []


@dead_letter_handler("testing_support.deliver")
def deliver(payload):
    DELIVERED.append(payload["order"])


def failing():
    raise ConnectionError("upstream down")


def test_retries_wait_on_the_fake_clock_not_in_real_time():
    policy = Policy(name="billing", max_retries=3, base_delay_ms=10_000, max_delay_ms=60_000, retry_budget_percent=None,
                    timeout_ms=600_000, attempt_timeout_ms=1_000)
    with resilience_test_engine(policies=[policy], orm_policies=False) as engine:
        result = execute("billing", failing)
    assert not result.ok and result.attempts == 4
    assert len(engine.clock.sleeps) == 3 and sum(engine.clock.sleeps) >= 10  # backoff walked on the clock


def test_the_engine_is_installed_for_the_block_only():
    before = get_engine()
    with resilience_test_engine(orm_policies=False) as engine:
        assert get_engine() is engine
    assert get_engine() is before


def test_an_open_breaker_refuses_until_its_reset_timeout_has_passed_on_the_clock():
    calls = []
    with resilience_test_engine(policies=[Policy(name="billing", reset_timeout_s=30)], orm_policies=False) as engine:
        engine.open_breaker("billing")
        refused = execute("billing", lambda: calls.append(1), fallbacks=(Fallback.value("cached"),))
        assert engine.breaker("billing").state == OPEN
        engine.advance(31)
        admitted = execute("billing", lambda: calls.append(1) or "live")
    assert (refused.ok, refused.value, refused.fallback_used) == (True, "cached", "value")
    assert admitted.value == "live" and calls == [1]


def test_a_spent_quota_refuses_the_next_call_without_reaching_the_upstream():
    calls = []
    with resilience_test_engine(policies=[Policy(name="maps", hourly_limit=100, daily_limit=1000)],
                                orm_policies=False) as engine:
        engine.spend_quota("maps")
        result = execute("maps", lambda: calls.append(1))
        assert engine.quota("maps").hourly_used == 100
        engine.advance(3600)  # the next hour
        again = execute("maps", lambda: calls.append(1) or "ok")
    assert result.error.category == ErrorCategory.QUOTA_EXCEEDED and again.value == "ok" and calls == [1]


def test_bad_arguments_name_what_is_wanted():
    with resilience_test_engine(policies=[Policy(name="maps")], orm_policies=False) as engine:
        with pytest.raises(ValueError, match="no hourly quota"):
            engine.spend_quota("maps")
        with pytest.raises(ValueError, match="window must be"):
            engine.spend_quota("maps", "weekly")
        with pytest.raises(ValueError, match="half-open follows"):
            engine.set_breaker_state("maps", HALF_OPEN)
        with pytest.raises(ImproperlyConfigured, match="nobody"):
            execute("nobody", lambda: None)


@pytest.mark.django_db
def test_policies_come_from_the_integration_rows_with_inline_timeouts():
    Integration.objects.create(name="crm", kind="external_api", max_retries=0)
    with resilience_test_engine() as engine:
        result = execute("crm", lambda: "ok")
        assert engine.registry.get("crm").timeout_enforcement == "inline"
    assert result.value == "ok"


@pytest.mark.django_db(transaction=True)
def test_redrive_now_runs_a_dead_letter_inline_even_before_its_backoff():
    DELIVERED.clear()
    Integration.objects.create(name="shop", kind="external_api")
    entry, _ = DeadLetter.enqueue("shop", "testing_support.deliver", {"order": 7})
    with resilience_test_engine():
        report = redrive_now("shop")
    entry.refresh_from_db()
    assert (report.succeeded, entry.status, DELIVERED) == (1, "succeeded", [7])
