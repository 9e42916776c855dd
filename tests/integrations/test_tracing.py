"""OpenTelemetry spans of guarded calls (integrations/resilience/tracing.py), read from the SDK's
in-memory exporter: one span per call, one per attempt, on both stores."""

import asyncio
import threading

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from integrations.conf import app_settings
from integrations.resilience import Fallback, aexecute, execute, get_engine, set_engine
from integrations.resilience.tracing import Tracing


@pytest.fixture(params=["local", "redis"])
def store_kind(request):
    """Every engine test of this module runs on the per-process store and on the shared Redis store."""
    return request.param


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter, provider
    provider.shutdown()


@pytest.fixture
def traced(make_engine, spans):
    exporter, provider = spans

    def build(**knobs):
        engine = make_engine(**knobs)
        engine.tracing = Tracing(tracer_provider=provider)
        return engine

    build.exporter, build.provider = exporter, provider
    return build


def finished(traced):
    """The engine's call spans and attempt spans, in the order they ended."""
    spans = traced.exporter.get_finished_spans()
    return ([span for span in spans if span.name.startswith("resilience.call ")],
            [span for span in spans if span.name.startswith("resilience.attempt ")])


def down():
    raise ConnectionError("upstream down")


def test_a_call_and_its_attempt_are_spans_with_the_calls_outcome(traced):
    traced(name="billing")
    assert execute("billing", lambda: "paid").ok
    (call,), (attempt,) = finished(traced)
    assert call.name == "resilience.call billing" and call.kind == trace.SpanKind.CLIENT
    assert dict(call.attributes) == {"resilience.integration": "billing", "resilience.outcome": "ok",
                                     "resilience.source": "live", "resilience.attempts": 1,
                                     "resilience.breaker_state": "closed"}
    assert attempt.parent.span_id == call.context.span_id
    assert dict(attempt.attributes) == {"resilience.integration": "billing", "resilience.attempt": 1,
                                        "resilience.outcome": "ok"}


def test_each_retry_is_an_attempt_span_with_its_failures_category(traced):
    traced(name="billing", max_retries=2, base_delay_ms=1, max_delay_ms=1, jitter=False)
    answers = iter([ConnectionError("reset"), TimeoutError("slow"), "paid"])

    def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert execute("billing", flaky).value == "paid"
    (call,), attempts = finished(traced)
    assert [span.attributes["resilience.attempt"] for span in attempts] == [1, 2, 3]
    assert [span.attributes.get("resilience.category") for span in attempts] == ["network", "timeout", None]
    assert [span.status.status_code for span in attempts] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
    assert attempts[0].events[0].name == "exception"  # the attempt's exception is recorded
    assert call.attributes["resilience.attempts"] == 3 and call.attributes["resilience.outcome"] == "ok"


def test_a_failed_call_has_status_error_and_a_fallback_is_named(traced):
    traced(name="billing", max_retries=0)
    assert not execute("billing", down).ok
    assert execute("billing", down, fallbacks=(Fallback.value("cached"),)).value == "cached"
    failed, served = finished(traced)[0]
    assert failed.status.status_code is StatusCode.ERROR and failed.attributes["resilience.category"] == "network"
    assert (served.attributes["resilience.source"], served.attributes["resilience.fallback"],
            served.attributes["resilience.outcome"]) == ("fallback", "value", "ok")
    assert served.status.status_code is StatusCode.UNSET


def test_the_breaker_state_the_call_met(traced, clock):
    traced(name="billing", max_retries=0, failure_threshold=1, reset_timeout_s=30, success_threshold=1)
    execute("billing", down)  # opens the breaker
    refused = execute("billing", lambda: "paid")
    assert refused.error.category.value == "circuit_open"
    clock.advance(31)
    assert execute("billing", lambda: "paid").ok  # the half-open trial call closes it
    assert execute("billing", lambda: "paid").ok
    calls, attempts = finished(traced)
    assert [span.attributes["resilience.breaker_state"] for span in calls] == ["closed", "open", "half_open", "closed"]
    assert calls[1].attributes["resilience.attempts"] == 0 and len(attempts) == 3  # a refusal makes no attempt


def test_spans_made_by_the_operation_nest_under_its_attempt_even_in_the_worker_thread(traced):
    traced(name="billing", timeout_enforcement="thread")
    tracer = traced.provider.get_tracer("upstream-client")
    threads = []

    def operation():
        threads.append(threading.current_thread())
        with tracer.start_as_current_span("GET /invoices"):
            return "paid"

    assert execute("billing", operation).ok
    assert threads[0] is not threading.main_thread()
    (call,), (attempt,) = finished(traced)
    (inner,) = [span for span in traced.exporter.get_finished_spans() if span.name == "GET /invoices"]
    assert inner.parent.span_id == attempt.context.span_id and attempt.parent.span_id == call.context.span_id


def test_async_calls_are_traced_the_same_way(traced):
    traced(name="billing", max_retries=1, base_delay_ms=1, max_delay_ms=1, jitter=False)
    answers = iter([ConnectionError("reset"), "paid"])

    async def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert asyncio.run(aexecute("billing", flaky)).value == "paid"
    (call,), attempts = finished(traced)
    assert [span.parent.span_id for span in attempts] == [call.context.span_id] * 2
    assert call.attributes["resilience.attempts"] == 2


def test_the_caller_sees_its_own_span_as_the_calls_parent_and_nothing_stays_current(traced):
    traced(name="billing")
    tracer = traced.provider.get_tracer("site")
    with tracer.start_as_current_span("GET /checkout") as request_span:
        execute("billing", lambda: "paid")
        assert trace.get_current_span() is request_span  # the call's span was detached
    (call,), _ = finished(traced)
    assert call.parent.span_id == request_span.get_span_context().span_id


def test_without_tracing_no_span_is_made(make_engine, spans):
    exporter, _ = spans
    engine = make_engine(name="billing")
    assert engine.tracing is None
    assert execute("billing", lambda: "paid").ok
    assert exporter.get_finished_spans() == ()


def test_the_setting_turns_it_on_and_a_missing_package_is_a_check_error(settings, monkeypatch):
    import importlib.util

    settings.RESILIENCE_TRACING = True
    set_engine(None)
    try:
        assert isinstance(get_engine().tracing, Tracing)
    finally:
        set_engine(None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "opentelemetry" else real_find_spec(name, *args))
    app_settings.reload()
    (error,) = [e for e in app_settings.check() if "RESILIENCE_TRACING" in e.msg]
    assert "OpenTelemetry is not installed" in error.msg
