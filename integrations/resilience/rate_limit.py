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

A busy client costs no round trip per request: ``LeaseBook`` keeps, per key, a lease of requests
counted in Redis ahead that this process then admits on its own. The book is independent of what
is counted (the Lua call that counts and grants is handed to it), so another counter in Redis can
lease the same way.
"""

from __future__ import annotations

import abc
import functools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from . import lua_api
from .clock import SystemClock
from .redis_link import RedisLink, unique_id

T = TypeVar("T")

# Leases: a lease is spent for at most LEASE_TTL_S and holds at most LEASE_MAX units, and at most
# 1/LEASE_SHARE of what is left under the limit; windows shorter than LEASE_MIN_WINDOW_S are
# counted request by request.
LEASE_TTL_S = 0.5
LEASE_MAX = 100
LEASE_SHARE = 16
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


# -- leases ------------------------------------------------------------------------------------


class Settlement(NamedTuple):
    """A lease to settle in Redis: its units ``<id>:1..size``, of which the first ``used`` were spent."""

    id: str
    size: int
    used: int


NO_SETTLEMENT = Settlement("", 0, 0)


class Grant(NamedTuple):
    """What the counter's Lua call answered about the lease: ``size`` units counted ahead as
    ``<id>:1..size`` (0: none), ``remaining`` left under the limit with them, and when the window resets."""

    id: str
    size: int
    remaining: int
    reset_at: float


class Lease:
    """One counter as this process last saw it in Redis, and the units it may spend on its own.

    ``size`` units were counted in Redis ahead; ``used`` of them have been spent. A lease of size
    0 holds nothing: it only remembers when the counter was last asked, so a second ask soon after
    marks the key as busy. ``terms`` are what the lease was counted for (a rate limit's limit and
    window): a lease is spent only for the same terms.
    """

    __slots__ = ("id", "size", "used", "terms", "remaining", "reset_at", "synced", "until")

    def __init__(self, grant: Grant, terms: tuple, synced: float) -> None:
        self.id = grant.id
        self.size = grant.size
        self.used = 0
        self.terms = terms
        self.remaining = grant.remaining  # what was left, this lease included, when it was granted
        self.reset_at = grant.reset_at
        self.synced = synced  # monotonic
        self.until = synced + LEASE_TTL_S

    def settlement(self) -> Settlement:
        return Settlement(self.id, self.size, self.used) if self.size else NO_SETTLEMENT


class LeaseBook:
    """This process's leases, one per key: how big, one renewal at a time, and settlement.

    How big a lease is asked for: none for a key not asked within 2 x LEASE_TTL_S (not busy),
    else twice what the last one spent, at least 2, at most LEASE_MAX. The counter's Lua call
    grants at most 1/LEASE_SHARE of what is left, so near the limit every unit is counted in
    Redis one by one and the limit holds exactly. Leases double while they are used up.

    A lease is settled (its spent units counted again at that time, the unspent ones given back)
    by the key's next round trip, or by ``due`` once it is past its time. A forked child forgets
    its parent's leases: both would spend the same units.
    """

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s  # how long a thread waits for another's renewal before asking itself
        self._forget()
        os.register_at_fork(after_in_child=functools.partial(_call_if_alive, weakref.WeakMethod(self._forget)))

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}  # key -> this process's view and lease
        self._unsettled: list[tuple[str, Lease]] = []  # leases replaced before they were settled
        self._renewals: dict[str, threading.Event] = {}  # key -> set when its renewal is done

    def take(self, key: str, terms: tuple, leasable: bool, spend: Callable[[Lease], T],
             ask: Callable[[Settlement, int], tuple[T, Grant]]) -> T:
        """One unit for ``key``: ``spend(lease)`` from this process's lease, else ``ask``'s round trip.

        ``ask(settlement, wanted)`` counts the unit in Redis, settles ``settlement`` and asks for a
        lease of ``wanted`` units (0: none); it answers (its verdict, the Grant). ``leasable`` False:
        no lease is ever asked for this key.
        """
        # One thread of the process renews a key's lease; the others wait for it rather than
        # all asking Redis at once (which is what a busy client's concurrent requests would do).
        for _ in range(2):
            with self._lock:
                seen = self._leases.get(key)
                if seen is not None and seen.used < seen.size and time.monotonic() < seen.until \
                        and seen.terms == terms:
                    seen.used += 1
                    return spend(seen)
                renewal = self._renewals.get(key)
                if renewal is None:
                    renewal = self._renewals[key] = threading.Event()
                    self._leases.pop(key, None)
                    break  # this thread renews
            renewal.wait(self.wait_s)
        else:
            return self._ask(key, terms, None, False, ask)  # still nothing to spend: no lease
        try:
            return self._ask(key, terms, seen, leasable, ask)
        finally:
            with self._lock:
                self._renewals.pop(key, None)
            renewal.set()

    def _ask(self, key: str, terms: tuple, seen: Lease | None, leasable: bool,
             ask: Callable[[Settlement, int], tuple[T, Grant]]) -> T:
        now_mono = time.monotonic()
        answer, grant = ask(NO_SETTLEMENT if seen is None else seen.settlement(),
                            _wanted(seen, now_mono) if leasable else 0)
        view = Lease(grant, terms, now_mono)
        with self._lock:
            replaced = self._leases.get(key)
            self._leases[key] = view
            if replaced is not None and replaced.size:
                # counted at the same time by a thread that did not wait: its lease is settled by due()
                self._unsettled.append((key, replaced))
        return answer

    def due(self, everything: bool) -> list[tuple[str, tuple, Settlement]]:
        """The leases to settle now, (key, terms, settlement): those past their time, or all of them."""
        now_mono = time.monotonic()
        with self._lock:
            due = [(key, view.terms, view.settlement()) for key, view in self._unsettled]
            self._unsettled = []
            for key, view in list(self._leases.items()):
                if not (everything or now_mono >= view.until):
                    continue
                if view.size:
                    due.append((key, view.terms, view.settlement()))
                    view.id, view.size = "", 0  # settled by the caller; ``used`` stays, to tell how busy the key is
                if everything or now_mono - view.synced >= 2 * LEASE_TTL_S:
                    del self._leases[key]  # not asked for a while: forgotten
        return due


def _wanted(seen: Lease | None, now_mono: float) -> int:
    """How big a lease to ask for: none for a key not asked within the last 2 x LEASE_TTL_S,
    else twice what the last one spent (at least 2, at most LEASE_MAX)."""
    if seen is None or now_mono - seen.synced >= 2 * LEASE_TTL_S:
        return 0
    return min(LEASE_MAX, max(2, 2 * seen.used))


def _call_if_alive(method: weakref.WeakMethod) -> None:
    bound = method()
    if bound is not None:
        bound()


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
