"""Hedging for idempotent reads (issue 15, item 4): an attempt still running after hedge_delay_ms
(or this process's observed p95) gets a second one alongside; the first success wins, the other
is abandoned; hedges count against the retry budget. Attempts run in worker threads, on real time.
"""

import asyncio
import threading
import time

import pytest

from http_support import http_server, integration, upstream  # noqa: F401 - fixtures
from integrations.errors import ErrorCategory
from integrations.http import AsyncClient, Client
from integrations.resilience import CallOptions, aexecute, execute, get_engine


class Racing:
    """The first call hangs until released; later ones answer at once (a slow replica, a fast one)."""

    def __init__(self, later=lambda n: f"fast {n}"):
        self.calls = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.later = later

    def __call__(self):
        with self.lock:
            self.calls += 1
            n = self.calls
        if n == 1:
            self.release.wait(10)
            return "slow 1"
        return self.later(n)


@pytest.fixture
def hedged(make_engine):
    def build(**knobs):
        knobs = {"timeout_enforcement": "thread", "hedge_delay_ms": 50, "attempt_timeout_ms": 5_000,
                 "max_retries": 0, "retry_budget_percent": None, **knobs}
        return make_engine(**knobs)
    return build


def test_a_slow_attempt_gets_a_hedge_and_the_first_success_wins(hedged):
    hedged()
    upstream = Racing()
    try:
        result = execute("svc", upstream)
    finally:
        upstream.release.set()
    assert (result.ok, result.value, result.attempts, upstream.calls) == (True, "fast 2", 2, 2)


def test_a_fast_attempt_is_not_hedged(hedged):
    hedged(hedge_delay_ms=2_000)
    calls = []
    result = execute("svc", lambda: calls.append(1) or "quick")
    assert (result.value, result.attempts, len(calls)) == ("quick", 1, 1)


def test_when_the_hedge_fails_the_first_attempt_can_still_win(hedged):
    hedged()

    def hedge_fails(n):
        upstream.release.set()  # the slow one finishes soon after
        raise ConnectionError("replica down")

    upstream = Racing(later=hedge_fails)
    result = execute("svc", upstream)
    assert (result.ok, result.value, result.attempts) == (True, "slow 1", 2)


def test_when_both_fail_the_call_fails_with_the_last_failure(hedged):
    hedged()
    release = threading.Event()
    calls = []

    def both_fail():
        calls.append(1)
        if len(calls) == 1:
            release.wait(10)  # set 0.3 s after the hedge failed: the first attempt fails last
            raise TimeoutError("slow replica gave up")
        threading.Timer(0.3, release.set).start()
        raise ConnectionError("replica down")

    result = execute("svc", both_fail)
    assert (result.ok, result.attempts) == (False, 2)
    assert result.error.category is ErrorCategory.TIMEOUT


def test_a_hedge_counts_against_the_retry_budget(hedged, make_engine):
    hedged(retry_budget_percent=0.0, minimum_calls=1)  # no retries allowed at all: no hedge either
    assert execute("svc", lambda: "warm").ok  # the budget applies once minimum_calls are in the window
    upstream = Racing()
    threading.Timer(0.3, upstream.release.set).start()
    result = execute("svc", upstream)
    assert (result.value, result.attempts, upstream.calls) == ("slow 1", 1, 1)


def test_no_hedge_without_a_free_bulkhead_slot(hedged):
    hedged(max_concurrent=1)
    upstream = Racing()
    threading.Timer(0.3, upstream.release.set).start()
    result = execute("svc", upstream)
    assert (result.value, upstream.calls) == ("slow 1", 1)


def test_the_caller_is_not_kept_past_the_attempt_timeout_when_both_hang(hedged):
    hedged(attempt_timeout_ms=300, timeout_ms=300)
    release = threading.Event()
    try:
        result = execute("svc", lambda: release.wait(10))
    finally:
        release.set()
    assert (result.error.category, result.attempts) == (ErrorCategory.TIMEOUT, 2), result.error


def test_a_call_can_turn_hedging_off(hedged):
    hedged()
    upstream = Racing()
    threading.Timer(0.3, upstream.release.set).start()
    result = execute("svc", upstream, call_options=CallOptions(hedge=False))
    assert (result.value, upstream.calls) == ("slow 1", 1)


def test_the_p95_delay_follows_the_observed_attempts(hedged):
    engine = hedged(hedge_delay_ms=5_000, hedge_after_p95=True)
    for _ in range(30):
        assert execute("svc", lambda: time.sleep(0.001) or "ok").ok
    upstream = Racing()
    try:
        result = execute("svc", upstream)  # hedged after ~the p95 (a few ms), not after 5 s
    finally:
        upstream.release.set()
    assert (result.value, upstream.calls) == ("fast 2", 2)


def test_bad_hedging_knobs_are_refused_naming_the_field():
    from integrations.resilience.policy import InvalidPolicy, Policy

    with pytest.raises(InvalidPolicy) as caught:
        Policy("svc", hedge_delay_ms=0, hedge_after_p95="yes")
    assert set(caught.value.errors) == {"hedge_delay_ms", "hedge_after_p95"}
    with pytest.raises(InvalidPolicy) as caught:
        CallOptions(hedge="no")
    assert list(caught.value.errors) == ["hedge"]


@pytest.mark.django_db
def test_the_http_client_hedges_a_get_but_never_a_post(upstream):
    integration(hedge_delay_ms=50, max_retries=0, retry_budget_percent=None)
    with Client("upstream", base_url=upstream.url) as http:
        assert http.get("/slow-first").json() == {"hits": 2}  # the hedge answered first
        assert http.post("/slow-first", json={}).json() == {"hits": 3}  # waited for: no second copy
    assert upstream.hits("/slow-first") == 3


# -- aexecute: the attempts are tasks; the loser is cancelled ---------------------------------


class AsyncRacing:
    """The first call waits until released (or cancelled); later ones answer at once."""

    def __init__(self, later=None):
        self.calls = 0
        self.cancelled = 0
        self.release = None
        self.later = later

    async def __call__(self):
        self.calls += 1
        n = self.calls
        if n == 1:
            self.release = asyncio.Event()
            try:
                await asyncio.wait_for(self.release.wait(), 10)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            return "slow 1"
        if self.later is not None:
            return await self.later(self, n)
        return f"fast {n}"


def test_aexecute_hedges_a_slow_coroutine_and_cancels_the_loser(hedged):
    engine = hedged()
    upstream = AsyncRacing()

    async def main():
        result = await aexecute("svc", upstream)
        await asyncio.sleep(0.05)  # the cancelled loser runs its except clause
        return result

    result = asyncio.run(main())
    assert (result.ok, result.value, result.attempts, upstream.calls, upstream.cancelled) == (True, "fast 2", 2, 2, 1)
    assert engine._local(engine.registry.get("svc")).bulkhead.in_flight == 0  # both slots given back


def test_aexecute_lets_the_first_attempt_win_when_the_hedge_fails(hedged):
    hedged()

    async def hedge_fails(upstream, n):
        upstream.release.set()
        raise ConnectionError("replica down")

    result = asyncio.run(aexecute("svc", AsyncRacing(later=hedge_fails)))
    assert (result.ok, result.value, result.attempts) == (True, "slow 1", 2)


def test_aexecute_does_not_hedge_a_fast_coroutine(hedged):
    hedged(hedge_delay_ms=2_000)
    calls = []

    async def quick():
        calls.append(1)
        return "quick"

    result = asyncio.run(aexecute("svc", quick))
    assert (result.value, result.attempts, len(calls)) == ("quick", 1, 1)


def test_aexecute_ends_by_the_attempt_timeout_when_both_hang(hedged):
    engine = hedged(attempt_timeout_ms=300, timeout_ms=300)

    async def hangs():
        await asyncio.sleep(10)

    result = asyncio.run(aexecute("svc", hangs))
    assert (result.error.category, result.attempts) == (ErrorCategory.TIMEOUT, 2), result.error
    snapshot = engine.store.snapshot(engine.registry.get("svc"))
    assert snapshot.window_failures == 1  # one timeout judged; the other attempt decides nothing


def test_aexecute_hedges_a_sync_operation_in_worker_threads(hedged):
    hedged()
    upstream = Racing()
    try:
        result = asyncio.run(aexecute("svc", upstream))
    finally:
        upstream.release.set()
    assert (result.ok, result.value, result.attempts, upstream.calls) == (True, "fast 2", 2, 2)


def test_aexecute_can_turn_hedging_off(hedged):
    hedged()
    upstream = AsyncRacing()

    async def main():
        asyncio.get_running_loop().call_later(0.3, lambda: upstream.release.set())
        return await aexecute("svc", upstream, call_options=CallOptions(hedge=False))

    result = asyncio.run(main())
    assert (result.value, upstream.calls) == ("slow 1", 1)


@pytest.mark.django_db
def test_the_async_http_client_hedges_a_get_but_never_a_post(upstream):
    integration(hedge_delay_ms=50, max_retries=0, retry_budget_percent=None)
    get_engine().registry.get("upstream")

    async def main():
        async with AsyncClient("upstream", base_url=upstream.url) as http:
            hedged_get = (await http.get("/slow-first")).json()
            waited_post = (await http.post("/slow-first", json={})).json()
            return hedged_get, waited_post

    assert asyncio.run(main()) == ({"hits": 2}, {"hits": 3})
    assert upstream.hits("/slow-first") == 3
