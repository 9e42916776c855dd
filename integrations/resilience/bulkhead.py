"""Bulkhead: at most ``max_concurrent`` attempts of one integration in flight.

Per process, like resilience4j's semaphore bulkhead. The excess waits up to
``bulkhead_wait_ms`` (never past the call's deadline), then BULKHEAD_FULL.
Sync and async callers share one counter; a slot is released when the
operation really ends, so an attempt abandoned at its timeout keeps its slot
until its thread finishes and a hung upstream makes the bulkhead shed.

With ``bulkhead_mode="adaptive"`` the limit follows the upstream's latency
(``AdaptiveLimit``: AIMD, as Netflix's concurrency-limits and Envoy's adaptive
concurrency do), between 1 and ``max_concurrent``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque


class Bulkhead:
    __slots__ = ("limit", "in_flight", "_lock", "_cond", "_async_waiters", "_sync_waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._async_waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._sync_waiters = 0

    def try_acquire(self) -> bool:
        with self._lock:
            if self.in_flight < self.limit:
                self.in_flight += 1
                return True
            return False

    def acquire(self, timeout: float) -> bool:
        if self.try_acquire():
            return True
        if timeout <= 0:
            return False
        deadline = time.monotonic() + timeout
        with self._cond:
            self._sync_waiters += 1
            try:
                while self.in_flight >= self.limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                self.in_flight += 1
                return True
            finally:
                self._sync_waiters -= 1

    async def aacquire(self, timeout: float) -> bool:
        if self.try_acquire():
            return True
        if timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            waiter = loop.create_future()
            with self._lock:
                if self.in_flight < self.limit:
                    self.in_flight += 1
                    return True
                self._async_waiters.append((loop, waiter))
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return self.try_acquire()

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1
            if self._sync_waiters:
                self._cond.notify()
            if not self._async_waiters:
                return
            waiters, self._async_waiters = self._async_waiters, deque()
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_wake, waiter)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class AdaptiveLimit:
    """An AIMD concurrency limit: a slow attempt (over ``slow_call_ms``) or a timeout lowers it by
    BACKOFF (multiplicative decrease); a fast one while at least half the limit is in flight raises
    it by 1 (additive increase), within [1, maximum]. It starts at the maximum: it only falls
    when the upstream slows down, and comes back as it recovers. Per process, like the bulkhead.
    """

    BACKOFF = 0.9

    __slots__ = ("maximum", "value")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.value = float(maximum)

    @property
    def limit(self) -> int:
        return max(1, int(self.value))

    def cap(self, maximum: int) -> None:
        """A saved policy's new max_concurrent: the limit stays within it."""
        self.maximum = maximum
        self.value = min(self.value, float(maximum))

    def sample(self, dropped: bool, in_flight: int) -> None:
        """One attempt's outcome: ``dropped`` when it was slow or timed out; ``in_flight`` as it ended."""
        if dropped:
            self.value = max(1.0, self.value * self.BACKOFF)
        elif in_flight * 2 >= self.value:
            self.value = min(float(self.maximum), self.value + 1)

