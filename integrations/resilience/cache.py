"""Response cache and last known values, in a Django cache.

A fresh entry (younger than the integration's ``cache_ttl_s``) is served
without calling the upstream. Entries stay ``RESILIENCE_CACHE_STALE_S`` past
their TTL so ``Fallback.cache()`` can serve them when the upstream fails.
Last known good values are kept longer (``RESILIENCE_LAST_KNOWN_TTL_S``) for
``Fallback.last_known()``. Keys are SHA-256 of the integration and the call's
parameters. A cache backend that fails is treated as a miss: the call goes on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import pickle
import threading
import time
from typing import Any

from .policy import Policy

logger = logging.getLogger("integrations.cache")

MISSING = object()


def key_material(fn, args: tuple, kwargs: dict, cache_key: Any) -> str | None:
    """Canonical JSON of what identifies a call, or None when it cannot be cached.

    An explicit ``cache_key`` must be JSON-serialisable (a programming error
    otherwise); without one, a named function (or a partial of one) and its
    arguments are used when the arguments are plain data.
    ``cache_key=False`` turns caching off for the call.
    """
    if cache_key is False:
        return None
    if cache_key is not None:
        try:
            return json.dumps(cache_key, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"cache_key must be JSON-serialisable: {exc}") from exc
    while isinstance(fn, functools.partial):
        args, kwargs = fn.args + tuple(args), {**fn.keywords, **kwargs}
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    if name is None or "<lambda>" in name:
        return None  # a callable object or a lambda: nothing stable names it across processes
    try:
        return json.dumps([fn.__module__, name, args, kwargs], sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None  # arguments that are not plain data: this call is not cached


def hashed_key(kind: str, policy: Policy, material: str) -> str:
    digest = hashlib.sha256(f"{policy.name}\x00{material}".encode()).hexdigest()
    return f"resilience:{kind}:{policy.name}:{policy.cache_version}:{digest}"


class _OncePerInterval:
    """Logs a backend failure once, then at most once a minute, not on every call."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last = 0.0
        self._lock = threading.Lock()

    def warn(self, message: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                return
            self._last = now
        logger.warning(message, *args, exc_info=True)


class ResponseCache:
    def __init__(self, alias: str = "default", stale_s: int = 3600, last_known_ttl_s: int = 604800) -> None:
        self.alias = alias
        self.stale_s = stale_s
        self.last_known_ttl_s = last_known_ttl_s
        self._warn = _OncePerInterval()

    @property
    def backend(self):
        from django.core.cache import caches

        return caches[self.alias]

    def _get(self, key: str):
        try:
            return self.backend.get(key, MISSING)
        except Exception:  # noqa: BLE001 - any backend failure is a miss: the cache must never fail a call
            self._warn.warn("response cache %r unreadable; serving live", self.alias)
            return MISSING

    def lookup(self, kind: str, policy: Policy, material: str, now: float, max_age: float | None):
        """(value, age_s) of the entry if stored and younger than max_age, else None."""
        entry = self._get(hashed_key(kind, policy, material))
        if entry is MISSING:
            return None
        stored_at, value = entry
        age = max(now - stored_at, 0.0)
        if max_age is not None and age >= max_age:
            return None
        return value, age

    def fresh(self, policy: Policy, material: str, now: float):
        return self.lookup("rc", policy, material, now, policy.cache_ttl_s)

    def stale(self, policy: Policy, material: str, now: float):
        return self.lookup("rc", policy, material, now, policy.cache_ttl_s + self.stale_s)

    def last_known(self, policy: Policy, material: str, now: float):
        return self.lookup("lk", policy, material, now, None)

    def store(self, policy: Policy, material: str, value: Any, now: float, *, response: bool, last_known: bool) -> None:
        entries, entry = {}, (now, value)
        if response:
            entries[hashed_key("rc", policy, material)] = entry
        if last_known:
            entries[hashed_key("lk", policy, material)] = entry
        if not entries:
            return
        timeout = self.last_known_ttl_s if last_known else policy.cache_ttl_s + self.stale_s
        try:
            if len(entries) == 1:
                (key, val), = entries.items()
                self.backend.set(key, val, timeout)
            else:
                # one round trip; the response entry outlives its TTL, which fresh() checks by age
                self.backend.set_many(entries, timeout)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            logger.warning("result of %s not cached: it cannot be pickled (%s)", policy.name, exc)
        except Exception:  # noqa: BLE001 - a cache write that fails must not fail the call that succeeded
            self._warn.warn("response cache %r unwritable; result of %s not cached", self.alias, policy.name)
