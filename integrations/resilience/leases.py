"""Leases: units of a counter in Redis taken ahead, for this process to spend without a round trip.

One mechanism for every counter the fleet shares: the inbound rate limiter's sliding windows
(rate_limit.RedisRateLimiter) and the integrations' hourly and daily quotas
(redis_store.RedisStore). The counter's Lua script grants the lease in the round trip that
counts a unit (rate_limit.lua, quota.lua: at most 1/LEASE_SHARE of what is left under the
limit); the LeaseBook decides how big a lease to ask for, spends it, and settles it: the spent
units stay counted, the unspent ones are given back.

How early a refusal can come: while a process holds unspent leased units, the counter in Redis
counts them as used, so another process may be refused with that many units not yet spent. A
lease is at most LEASE_MAX units and at most 1/LEASE_SHARE of what was left when it was granted,
and it is spent for at most LEASE_TTL_S; then it is settled by the key's next round trip or by
the link's flusher within its interval (and at exit, for the quota). Near the limit (fewer than
LEASE_SHARE units left) no lease is granted: every unit is counted in Redis one by one, so the
limit holds exactly and the last units go to whoever asks first.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import NamedTuple, TypeVar

T = TypeVar("T")

# A lease is spent for at most LEASE_TTL_S and holds at most LEASE_MAX units, and at most
# 1/LEASE_SHARE of what is left under the limit.
LEASE_TTL_S = 0.5
LEASE_MAX = 100
LEASE_SHARE = 16


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
        os.register_at_fork(after_in_child=functools.partial(call_if_alive, weakref.WeakMethod(self._forget)))

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

    def unspent(self, key: str) -> int:
        """Units of ``key`` this process took ahead and has neither spent nor given back yet."""
        with self._lock:
            views = [view for k, view in self._unsettled if k == key]
            if key in self._leases:
                views.append(self._leases[key])
            return sum(view.size - view.used for view in views if view.size)

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


def call_if_alive(method: weakref.WeakMethod, *args) -> None:
    """``method(*args)`` unless its object is gone (for at-fork and at-exit hooks, which must not keep it)."""
    bound = method()
    if bound is not None:
        bound(*args)
