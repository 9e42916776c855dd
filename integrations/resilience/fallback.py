"""Fallbacks: what a failed or refused call serves instead, tried in order.

The first fallback that yields a value wins. ``cache`` and ``last_known``
yield nothing when no entry is stored; ``call`` yields nothing when its
function raises (logged). ``value`` always yields, even ``None``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

logger = logging.getLogger("integrations.fallback")

CACHE = "cache"
LAST_KNOWN = "last_known"
VALUE = "value"
CALL = "call"


class Fallback:
    __slots__ = ("kind", "payload", "fn")

    def __init__(self, kind: str, payload: Any = None, fn: Callable | None = None) -> None:
        self.kind = kind
        self.payload = payload
        self.fn = fn

    @classmethod
    def cache(cls) -> Fallback:
        """The cached response for these parameters, even past its TTL (stale-if-error)."""
        return cls(CACHE)

    @classmethod
    def last_known(cls) -> Fallback:
        """The last good value returned for these parameters."""
        return cls(LAST_KNOWN)

    @classmethod
    def value(cls, value: Any) -> Fallback:
        return cls(VALUE, payload=value)

    @classmethod
    def call(cls, fn: Callable) -> Fallback:
        """``fn(*args, **kwargs)`` with the operation's arguments; may be async under aexecute."""
        if not callable(fn):
            raise TypeError(f"Fallback.call needs a callable, got {fn!r}")
        return cls(CALL, fn=fn)

    def __repr__(self) -> str:
        if self.kind == VALUE:
            return f"Fallback.value({self.payload!r})"
        if self.kind == CALL:
            return f"Fallback.call({getattr(self.fn, '__qualname__', self.fn)!r})"
        return f"Fallback.{self.kind}()"


def check_fallbacks(fallbacks) -> tuple[Fallback, ...]:
    fallbacks = tuple(fallbacks or ())
    for fallback in fallbacks:
        if not isinstance(fallback, Fallback):
            raise TypeError(f"fallbacks must be Fallback objects (Fallback.value(x), ...), got {fallback!r}")
    return fallbacks


def is_async_callable(fn: Callable) -> bool:
    code = getattr(fn, "__code__", None)  # plain functions and bound methods: read the flag directly
    if code is not None:
        return bool(code.co_flags & inspect.CO_COROUTINE)
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
