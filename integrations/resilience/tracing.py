"""OpenTelemetry spans for guarded calls: one per call, one per attempt inside it.

Off unless ``RESILIENCE_TRACING`` is on (it needs the ``opentelemetry-api`` package:
``pip install "django-resilience-control-plane[otel]"``); when off the engine's only cost is
one ``is None`` test per call and per attempt. Spans go to the tracer provider the site
configured (``opentelemetry.trace.set_tracer_provider``, an exporter of its choice).

The call span, ``resilience.call <integration>`` (kind CLIENT), has the attributes:

- ``resilience.integration``: the integration's name;
- ``resilience.outcome``: ``ok`` or ``failure``; ``resilience.source``: live, cache or fallback;
- ``resilience.category``: the failure's category (timeout, circuit_open, ...), when there was one;
- ``resilience.attempts``: attempts made;
- ``resilience.breaker_state``: the breaker state the call met (open when refused by it,
  half_open when an attempt was a trial call, else closed);
- ``resilience.fallback``: the fallback that served the value (value, call, cache, last_known).

A failed call's span has status ERROR. Each attempt span, ``resilience.attempt <integration>``,
is the current span while the operation runs (in the worker thread too), so the upstream
client's own spans (httpx, psycopg instrumentations) nest under it; it has
``resilience.integration``, ``resilience.attempt`` (1, 2, ...), ``resilience.outcome`` and
``resilience.category``, and records the attempt's exception.
"""

from __future__ import annotations

from typing import Any

from ..errors import ErrorCategory, classify

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the optional dependency: Tracing() says what to install
    trace = None

INSTRUMENTATION_NAME = "integrations.resilience"


class CallSpan:
    """The span of one call, carried by the engine's call state while it runs."""

    __slots__ = ("span", "token", "trial")

    def __init__(self, span, token) -> None:
        self.span, self.token, self.trial = span, token, False


class Tracing:
    """Starts and ends the engine's spans (see the module docstring)."""

    def __init__(self, tracer_provider: Any = None) -> None:
        if trace is None:
            raise ImportError('RESILIENCE_TRACING needs OpenTelemetry: pip install "opentelemetry-api>=1.20" '
                              '(or the extra: django-resilience-control-plane[otel])')
        self.tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)

    # -- the call --------------------------------------------------------------

    def start_call(self, integration: str) -> CallSpan:
        span = self.tracer.start_span(f"resilience.call {integration}", kind=SpanKind.CLIENT,
                                      attributes={"resilience.integration": integration})
        return CallSpan(span, otel_context.attach(trace.set_span_in_context(span)))

    def end_call(self, handle: CallSpan, result):
        """End the call's span with its CallResult; returns the result."""
        span = handle.span
        otel_context.detach(handle.token)
        error = result.error
        category = error.category if error is not None else None
        attributes = {
            "resilience.outcome": "ok" if result.ok else "failure",
            "resilience.source": result.source,
            "resilience.attempts": result.attempts,
            "resilience.breaker_state": ("open" if category is ErrorCategory.CIRCUIT_OPEN
                                         else "half_open" if handle.trial else "closed"),
        }
        if category is not None:
            attributes["resilience.category"] = category.value
        if result.fallback_used:
            attributes["resilience.fallback"] = result.fallback_used
        span.set_attributes(attributes)
        if not result.ok:
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()
        return result

    def abandon_call(self, handle: CallSpan, exc: BaseException) -> None:
        """The caller went away (cancellation, KeyboardInterrupt) or the engine raised: end the span with it."""
        span = handle.span
        otel_context.detach(handle.token)
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        span.end()

    # -- each attempt ----------------------------------------------------------

    def start_attempt(self, call: CallSpan, integration: str, number: int, trial: bool):
        call.trial = call.trial or trial
        span = self.tracer.start_span(f"resilience.attempt {integration}", kind=SpanKind.INTERNAL,
                                      attributes={"resilience.integration": integration, "resilience.attempt": number})
        return span, otel_context.attach(trace.set_span_in_context(span))

    def end_attempt(self, handle, exc: BaseException | None, integration: str) -> None:
        span, token = handle
        otel_context.detach(token)
        if exc is None:
            span.set_attribute("resilience.outcome", "ok")
        else:
            span.set_attributes({"resilience.outcome": "failure",
                                 "resilience.category": classify(exc, integration).category.value})
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        span.end()
