"""Attempt timeouts, for sync and async operations.

Each attempt runs for at most min(``attempt_timeout_ms``, time left before the
call's overall deadline). Coroutines are cancelled at their timeout. A sync
operation, under the default ``thread`` enforcement, runs in the
integration's worker pool and the caller stops waiting at the timeout (a
thread cannot be killed: it finishes in the background, holding its bulkhead
slot until it does). Under ``inline`` enforcement it runs in the caller's
thread and an overrun is reported as a timeout once it returns.

``attempt_time_left()`` tells an operation how long its attempt has, so a
client library can pass the same budget to its own timeout (the http Client
does).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

_attempt_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("attempt_deadline", default=None)

# When the current guarded attempt ends (time.monotonic()), or None outside one: the context
# variable's own getter, so a caller on every socket operation pays no Python call for it.
attempt_deadline: Callable[[], float | None] = _attempt_deadline.get


def attempt_time_left() -> float | None:
    """Seconds left in the current guarded attempt, or None outside one."""
    deadline = _attempt_deadline.get()
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class AttemptTimeout(TimeoutError):
    def __init__(self, timeout_s: float, overrun: bool = False) -> None:
        how = "overran" if overrun else "did not finish within"
        super().__init__(f"attempt {how} its {timeout_s * 1000:.0f} ms timeout")
        self.timeout_s = timeout_s


def _in_attempt(deadline: float, fn: Callable, args: tuple, kwargs: dict, release: Callable[[], None]) -> Any:
    token = _attempt_deadline.set(deadline)
    try:
        return fn(*args, **kwargs)
    finally:
        _attempt_deadline.reset(token)
        release()


def run_inline(
    fn: Callable, args: tuple, kwargs: dict, timeout_s: float, release: Callable[[], None],
    started: float, now: Callable[[], float] = time.monotonic,
) -> Any:
    """The attempt in the caller's thread; ``started`` (by ``now``) is when it began. An attempt
    that returns past its timeout raises AttemptTimeout (an overrun)."""
    value = _in_attempt(time.monotonic() + timeout_s, fn, args, kwargs, release)
    if now() - started > timeout_s:
        raise AttemptTimeout(timeout_s, overrun=True)
    return value


def submit(executor: ThreadPoolExecutor, fn: Callable, args: tuple, kwargs: dict, deadline: float,
           release: Callable[[], None]) -> Future:
    """Start one attempt in a worker thread, in the caller's context, with the attempt's deadline set."""
    context = contextvars.copy_context()
    return executor.submit(context.run, _in_attempt, deadline, fn, args, kwargs, release)


def run_in_thread(
    executor: ThreadPoolExecutor, fn: Callable, args: tuple, kwargs: dict, timeout_s: float, release: Callable[[], None]
) -> Any:
    future = submit(executor, fn, args, kwargs, time.monotonic() + timeout_s, release)
    try:
        return future.result(timeout_s)
    except FutureTimeout:
        abandon(future, release)
        raise AttemptTimeout(timeout_s) from None


def abandon(future, release: Callable[[], None]) -> None:
    # A running thread cannot be stopped: it finishes on its own and releases its
    # slot then. One that never started is cancelled here and its slot freed now.
    if future.cancel() or future.cancelled():
        release()


async def run_async(
    executor: ThreadPoolExecutor, fn: Callable, args: tuple, kwargs: dict, timeout_s: float,
    release: Callable[[], None], is_coroutine: bool,
) -> Any:
    deadline = time.monotonic() + timeout_s
    if not is_coroutine:
        # a sync operation under aexecute: never block the event loop
        future = submit(executor, fn, args, kwargs, deadline, release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except TimeoutError:
            abandon(future, release)
            raise AttemptTimeout(timeout_s) from None
        except asyncio.CancelledError:  # the awaiting task was cancelled (a lost hedge, the caller): let go
            abandon(future, release)
            raise
    token = _attempt_deadline.set(deadline)
    try:
        return await asyncio.wait_for(fn(*args, **kwargs), timeout_s)
    except TimeoutError as exc:
        if time.monotonic() >= deadline:
            raise AttemptTimeout(timeout_s) from exc
        raise  # the operation's own TimeoutError, raised before our deadline
    finally:
        _attempt_deadline.reset(token)
        release()
