"""Inbound rate limiting: sliding windows per client, per process or for the fleet in Redis, and leases.

``RateLimitMiddleware`` (integrations/inbound.py) asks the engine's state store for its
``rate_limiter`` and calls ``hit(key, limit, window_s)``, which answers a RateLimit (the verdict
and what the X-RateLimit-* headers say). Two limiters, one per place where state lives:

- ``LocalRateLimiter``: this process's windows (a deque of request times per key). The
  per-process store's limiter, and the Redis limiter's while Redis is away.
- ``RedisRateLimiter``: one sorted set per key in Redis, trimmed and counted by one atomic
  script (``lua/rate_limit.lua``), so the fleet allows exactly ``limit``. It talks to Redis
  through the store's RedisLink: the same client and connection pool, the same outage (per
  process meanwhile, one warning, tried again later) and the same flusher thread.

A busy client costs no round trip per request: a ``leases.LeaseBook`` keeps, per key, a lease of
requests counted in Redis ahead that this process then admits on its own (the shared store's
quota leases the same way).
"""

from __future__ import annotations

import abc
import functools
import threading
from collections import deque

from . import lua_api
from .clock import SystemClock
from .leases import LEASE_SHARE, Grant, Lease, LeaseBook, Settlement
from .redis_link import RedisLink, unique_id

# Windows shorter than this are counted request by request: a lease would be most of them.
LEASE_MIN_WINDOW_S = 5.0


class RateLimit:
    """The answer to one request against a sliding-window limit (for X-RateLimit-* headers)."""

    __slots__ = ("allowed", "limit", "remaining", "reset_at")

    def __init__(self, allowed: bool, limit: int, remaining: int, reset_at: float) -> None:
        self.allowed = allowed
        self.limit = limit
        self.remaining = remaining
        self.reset_at = reset_at  # when the oldest counted request leaves the window

    def __repr__(self) -> str:
        return f"RateLimit(allowed={self.allowed}, {self.remaining}/{self.limit} left, reset_at={self.reset_at:.3f})"


class RateLimiter(abc.ABC):
    """Sliding-window limits: at most ``limit`` requests per key in any ``window_s`` seconds."""

    clock: SystemClock  # the wall clock of the verdicts' reset_at

    @abc.abstractmethod
    def hit(self, key: str, limit: int, window_s: float) -> RateLimit:
        """Count one request against a sliding-window limit; refused requests are not counted."""


class LocalRateLimiter(RateLimiter):
    """This process's windows, guarded by one lock."""

    def __init__(self, clock=None) -> None:
        self.clock = clock or SystemClock()
        self._windows: dict[str, deque] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, limit: int, window_s: float) -> RateLimit:
        now = self.clock.time()
        with self._lock:
            stamps = self._windows.setdefault(key, deque())
            while stamps and stamps[0] <= now - window_s:
                stamps.popleft()
            allowed = len(stamps) < limit
            if allowed:
                stamps.append(now)
            reset_at = (stamps[0] if stamps else now) + window_s
            return RateLimit(allowed, limit, max(limit - len(stamps), 0), reset_at)


# -- the fleet's windows, in Redis ---------------------------------------------------------------


class RedisRateLimiter(RateLimiter):
    """The fleet's windows: one round trip per request, or none on a lease.

    A client that is busy in this process (counted here again within a second) is given a lease
    (see LeaseBook). Meanwhile other processes see the unspent part as used: a client at the very
    end of its budget may be refused up to a second early. X-RateLimit-Remaining from a lease is
    what this process knows. While Redis is unreachable, ``local`` counts.
    """

    def __init__(self, link: RedisLink, prefix: str, local: LocalRateLimiter) -> None:
        self.link = link
        self.clock = link.clock
        self.prefix = prefix
        self.local = local
        self._script = lua_api.load(link.client, "rate_limit")
        self.leases = LeaseBook(wait_s=link.socket_timeout_s * 2)
        link.on_flush(functools.partial(self.flush, everything=False))

    def hit(self, key: str, limit: int, window_s: float) -> RateLimit:
        if self.link.waiting():
            return self.local.hit(key, limit, window_s)
        return self.leases.take(key, (limit, float(window_s)), window_s >= LEASE_MIN_WINDOW_S,
                                spend=_from_lease,
                                ask=functools.partial(self._count, key, limit, window_s))

    def _count(self, key: str, limit: int, window_s: float, settlement: Settlement,
               wanted: int) -> tuple[RateLimit, Grant]:
        """One round trip: this request counted, ``settlement`` settled, a lease of ``wanted`` asked for."""
        call_id = unique_id()
        args = lua_api.rate_limit_argv(self.clock.time(), window_s, limit, call_id, True, settlement, wanted,
                                       LEASE_SHARE)
        reply = self.link.call(self._script, keys=[lua_api.rate_limit_key(self.prefix, key)], args=args)
        if reply is None:
            verdict = self.local.hit(key, limit, window_s)
            return verdict, Grant("", 0, verdict.remaining, verdict.reset_at)
        counted = lua_api.decode_rate_limit(reply)
        if counted.granted:
            self.link.ensure_flusher()
        return (RateLimit(counted.allowed, limit, counted.remaining, counted.reset_at),
                Grant(call_id, counted.granted, counted.remaining, counted.reset_at))

    def flush(self, everything: bool = True) -> None:
        """Settle leases past their time (or all of them): one pipelined round trip for all."""
        due = self.leases.due(everything)
        if not due or self.link.waiting():
            return
        now = self.clock.time()
        pipe = self.link.client.pipeline(transaction=False)
        for key, (limit, window_s), settlement in due:
            self._script(keys=[lua_api.rate_limit_key(self.prefix, key)], client=pipe,
                         args=lua_api.rate_limit_argv(now, window_s, limit, unique_id(), False, settlement, 0,
                                                      LEASE_SHARE))
        # unreachable: the leases' requests stay counted at the time they were leased
        self.link.call(pipe.execute)


def _from_lease(lease: Lease) -> RateLimit:
    limit, _window_s = lease.terms
    return RateLimit(True, limit, max(lease.remaining - lease.used, 0), lease.reset_at)
