"""Guarded outbound calls: ``execute``, ``aexecute`` and ``@resilient``.

    result = execute("billing", charge, order_id, fallbacks=(Fallback.value(None),))

The pipeline's order is in ``engine.py`` (and docs/pipeline.md). This package
imports neither the ORM models nor monitoring: policies come from a source the
integrations app installs, and outcomes leave as events.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable

from .engine import CallResult, Engine
from .fallback import Fallback, is_async_callable
from .options import CallOptions, deadline
from .policy import Policy

__all__ = [
    "CallOptions",
    "CallResult",
    "Engine",
    "Fallback",
    "Policy",
    "aexecute",
    "deadline",
    "execute",
    "get_engine",
    "install_policy_source",
    "resilient",
    "set_engine",
    "use_engine",
]

_engine: Engine | None = None
_engine_lock = threading.Lock()
_policy_source: dict = {"loader": None, "creator": None}


def _build_default_engine() -> Engine:
    from ..conf import app_settings as settings

    from .cache import ResponseCache
    from .registry import PolicyRegistry

    registry = PolicyRegistry(
        loader=_policy_source["loader"],
        creator=_policy_source["creator"],
        refresh_s=settings.POLICY_REFRESH_S,
        auto_register=settings.AUTO_REGISTER,
    )
    cache = ResponseCache(
        alias=settings.CACHE_ALIAS,
        stale_s=settings.CACHE_STALE_S,
        last_known_ttl_s=settings.LAST_KNOWN_TTL_S,
    )
    store = None
    target = shared_store_target()
    if target is not None:
        from .redis_connect import connect
        from .redis_store import RedisStore

        client = connect(target, connect_timeout_s=settings.REDIS_CONNECT_TIMEOUT_S,
                         socket_timeout_s=settings.REDIS_SOCKET_TIMEOUT_S)
        store = RedisStore(client=client, prefix=settings.KEY_PREFIX, socket_timeout_s=settings.REDIS_SOCKET_TIMEOUT_S)
    tracing = None
    if settings.TRACING:
        from .tracing import Tracing

        tracing = Tracing()
    return Engine(registry=registry, cache=cache, store=store, faults_enabled=settings.FAULT_INJECTION,
                  tracing=tracing)


def shared_store_target():
    """Where the shared store's Redis is (a redis_connect.RedisTarget), or None: per-process state.

    The explicit form (RESILIENCE_REDIS) when it is set, else RESILIENCE_REDIS_URL's.
    """
    from ..conf import app_settings as settings

    from .redis_connect import parse_url

    if settings.REDIS is not None:
        return settings.REDIS
    return parse_url(settings.REDIS_URL) if settings.REDIS_URL else None


def get_engine() -> Engine:
    global _engine
    engine = _engine
    if engine is None:
        with _engine_lock:
            if _engine is None:
                _engine = _build_default_engine()
            engine = _engine
    return engine


def set_engine(engine: Engine | None) -> Engine | None:
    """Replace the process's engine (None: rebuild from settings on next use); returns the old one."""
    global _engine
    with _engine_lock:
        old, _engine = _engine, engine
    return old


@contextlib.contextmanager
def use_engine(engine: Engine):
    """Run a block against another engine, e.g. one with a FakeClock in tests."""
    old = set_engine(engine)
    try:
        yield engine
    finally:
        set_engine(old)


def install_policy_source(loader: Callable, creator: Callable | None = None) -> None:
    """Where policies come from: called by the integrations app with its ORM loader."""
    _policy_source["loader"] = loader
    _policy_source["creator"] = creator
    engine = _engine
    if engine is not None:
        engine.registry.loader = loader
        engine.registry.creator = creator


def execute(name: str, fn: Callable, *args, cache_key=None, fallbacks=(), dead_letter=None,
            call_options: CallOptions | None = None, **kwargs) -> CallResult:
    """Run ``fn(*args, **kwargs)`` through integration ``name``'s pipeline; never raises for its failure.

    ``call_options``: this call's overrides of the integration's timeouts and retries, and what
    else to retry (CallOptions).
    """
    return get_engine().execute(name, fn, *args, cache_key=cache_key, fallbacks=fallbacks,
                                dead_letter=dead_letter, call_options=call_options, **kwargs)


async def aexecute(name: str, fn: Callable, *args, cache_key=None, fallbacks=(), dead_letter=None,
                   call_options: CallOptions | None = None, **kwargs) -> CallResult:
    """The async twin of ``execute``, for coroutine functions."""
    return await get_engine().aexecute(name, fn, *args, cache_key=cache_key, fallbacks=fallbacks,
                                       dead_letter=dead_letter, call_options=call_options, **kwargs)


def resilient(name: str, *, fallbacks=(), cache_key: Callable | None = None, call_options: CallOptions | None = None):
    """Guard a function: it returns the value (live, cached or fallback) or raises ResilienceError.

    ``cache_key``, if given, is called with the function's arguments to make
    the cache key; otherwise the arguments themselves are used when cacheable.
    ``call_options`` apply to every call of the function.
    """

    def decorate(fn: Callable) -> Callable:
        def key_for(args, kwargs):
            return cache_key(*args, **kwargs) if cache_key is not None else None

        if is_async_callable(fn):
            @functools.wraps(fn)
            async def async_guarded(*args, **kwargs):
                result = await aexecute(name, fn, *args, cache_key=key_for(args, kwargs), fallbacks=fallbacks,
                                        call_options=call_options, **kwargs)
                return result.unwrap()

            return async_guarded

        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            return execute(name, fn, *args, cache_key=key_for(args, kwargs), fallbacks=fallbacks,
                           call_options=call_options, **kwargs).unwrap()

        return guarded

    return decorate
