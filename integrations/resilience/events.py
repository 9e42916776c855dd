"""Events the engine publishes; monitoring and persistence subscribe.

The engine imports neither the ORM nor monitoring: it publishes a
``CallFinished`` per guarded call, a ``StateTransition`` per breaker
transition, and a ``DeadLetterRequested`` when a failed call carries work to
keep. Subscribers run synchronously in the caller's thread and must be quick;
one that raises is logged and the others still run, because a monitoring bug
must not fail the call it observes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .breaker import Transition

logger = logging.getLogger("integrations.events")


class CallFinished:
    """One guarded call's outcome. A plain slots class: it is built on every call."""

    __slots__ = ("integration", "ok", "source", "category", "attempts", "retries", "latency_ms",
                 "attempt_latencies_ms", "fallback_used", "cache", "at")

    def __init__(self, integration: str, ok: bool, source: str, category: str | None, attempts: int, retries: int,
                 latency_ms: float, attempt_latencies_ms: tuple, fallback_used: str | None, cache: str | None,
                 at: float) -> None:
        self.integration = integration
        self.ok = ok
        self.source = source  # live | cache | fallback
        self.category = category  # the failure's ErrorCategory value, if any
        self.attempts = attempts
        self.retries = retries
        self.latency_ms = latency_ms
        self.attempt_latencies_ms = attempt_latencies_ms
        self.fallback_used = fallback_used
        self.cache = cache  # hit | miss | None when the call was not cacheable
        self.at = at

    def __repr__(self) -> str:
        return f"CallFinished({self.integration!r}, ok={self.ok}, source={self.source!r}, category={self.category!r})"


@dataclass(frozen=True, slots=True)
class StateTransition:
    transition: Transition


@dataclass(frozen=True, slots=True)
class DeadLetterRequested:
    integration: str
    handler: str
    payload: Any
    error: dict
    attempts: int
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SharedStateChanged:
    """Shared state (Redis) was lost or came back; while lost, state is per process."""

    shared: bool
    reason: str
    at: float


class EventBus:
    def __init__(self) -> None:
        self._subscribers: dict[type, tuple[Callable, ...]] = {}
        self._lock = threading.Lock()

    def subscribe(self, event_type: type, handler: Callable) -> Callable:
        with self._lock:
            current = self._subscribers.get(event_type, ())
            if handler not in current:
                self._subscribers[event_type] = current + (handler,)
        return handler

    def unsubscribe(self, event_type: type, handler: Callable) -> None:
        with self._lock:
            self._subscribers[event_type] = tuple(h for h in self._subscribers.get(event_type, ()) if h is not handler)

    def has_subscribers(self, event_type: type) -> bool:
        return bool(self._subscribers.get(event_type))

    def publish(self, event: Any) -> None:
        for handler in self._subscribers.get(type(event), ()):
            try:
                handler(event)
            except Exception:  # noqa: BLE001 - see module docstring: observers must not fail the call
                logger.exception("event subscriber %r failed on %s", handler, type(event).__name__)


bus = EventBus()
subscribe = bus.subscribe
unsubscribe = bus.unsubscribe
