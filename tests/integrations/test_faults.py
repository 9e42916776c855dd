"""Game-day fault injection: off by default, applied in the attempt, expires by itself."""

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from integrations.errors import ErrorCategory
from integrations.models import FaultInjection, Integration
from integrations.resilience import Policy, execute, get_engine

STORE_KINDS = ["local", "redis"]


def ok():
    return "ok"


def test_an_active_injection_fails_its_share_of_attempts(make_engine, clock, upstream):
    engine = make_engine(max_retries=0, failure_threshold=10**6, failure_rate_threshold=0,
                         fault_until=clock.time() + 60, fault_error_percent=30)
    engine.faults_enabled = True
    op = upstream("ok")
    results = [execute("svc", op) for _ in range(1000)]
    failed = [r for r in results if not r.ok]
    assert 230 <= len(failed) <= 370  # 30 % of 1,000 on a seeded source
    assert all(r.error.category is ErrorCategory.SERVER_ERROR and r.error.details["injected"] for r in failed)
    assert op.calls == 1000 - len(failed)  # an injected failure never reached the upstream


def test_injected_failures_are_retried_and_trip_the_breaker_like_real_ones(make_engine, clock, upstream):
    engine = make_engine(max_retries=2, base_delay_ms=1, failure_threshold=3, fault_until=clock.time() + 60,
                         fault_error_percent=100)
    engine.faults_enabled = True
    first = execute("svc", upstream("ok"))
    assert first.attempts == 3
    assert engine.breaker("svc").state == "open"


def test_injected_latency_counts_against_the_attempt_timeout(make_engine, clock, upstream):
    engine = make_engine(max_retries=0, attempt_timeout_ms=100, fault_until=clock.time() + 60, fault_latency_ms=500)
    engine.faults_enabled = True
    result = execute("svc", upstream("ok"))
    assert result.error.category is ErrorCategory.TIMEOUT


def test_an_injection_expires_by_itself(make_engine, clock, upstream):
    engine = make_engine(max_retries=0, fault_until=clock.time() + 60, fault_error_percent=100)
    engine.faults_enabled = True
    assert not execute("svc", ok).ok
    clock.advance(60)
    assert execute("svc", ok).ok


def test_faults_are_not_applied_when_fault_injection_is_off(make_engine, clock):
    make_engine(max_retries=0, fault_until=clock.time() + 60, fault_error_percent=100)
    assert execute("svc", ok).ok  # engine.faults_enabled is False by default


@pytest.mark.django_db
def test_injecting_is_refused_while_the_setting_is_off(settings):
    settings.RESILIENCE_FAULT_INJECTION = False
    row = Integration.objects.create(name="billing")
    with pytest.raises(PermissionDenied, match="RESILIENCE_FAULT_INJECTION"):
        row.inject_fault(error_percent=50, minutes=5, by="alice")
    assert not FaultInjection.objects.exists()


@pytest.mark.django_db
def test_bad_injections_are_refused_naming_the_field(settings):
    settings.RESILIENCE_FAULT_INJECTION = True
    row = Integration.objects.create(name="billing")
    for kwargs, field in (({"error_percent": 150}, "error_percent"), ({"latency_ms": -1, "error_percent": 5},
                          "latency_ms"), ({}, "error_percent"), ({"error_percent": 5, "minutes": 0}, "minutes"),
                          ({"error_percent": 5, "minutes": 10**6}, "minutes")):
        with pytest.raises(ValidationError) as caught:
            row.inject_fault(by="alice", **kwargs)
        assert field in caught.value.message_dict
    assert not FaultInjection.objects.exists()


@pytest.mark.django_db
def test_an_operator_injection_is_logged_reaches_the_engine_and_can_be_stopped(settings, caplog,
                                                                             django_capture_on_commit_callbacks):
    settings.RESILIENCE_FAULT_INJECTION = True
    row = Integration.objects.create(name="billing", max_retries=0, timeout_enforcement="inline")
    with django_capture_on_commit_callbacks(execute=True):
        injection = row.inject_fault(error_percent=100, minutes=5, by="alice")
    assert injection.active and injection.created_by == "alice"
    assert "fault injection on billing by alice" in caplog.text
    assert execute("billing", ok).error.details["injected"]
    with django_capture_on_commit_callbacks(execute=True):
        row.stop_fault(by="bob")
    assert execute("billing", ok).ok
    injection.refresh_from_db()
    assert not injection.active and injection.stopped_by == "bob"


def test_the_policy_carries_no_fault_unless_one_is_injected():
    policy = Policy(name="p")
    assert (policy.fault_until, policy.fault_error_percent, policy.fault_latency_ms) == (0.0, 0.0, 0)
    assert get_engine().faults_enabled is False
