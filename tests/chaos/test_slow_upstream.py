"""Chaos: a slow, trickling, resetting and finally hung upstream, behind the fault-injecting proxy.

Eight caller threads call the upstream through tests/chaos/proxy.py with the
http Client (attempts in the integration's worker threads, httpx's own
timeout set to each attempt's budget), phase after phase: no fault, latency
beyond the attempt timeout, a bandwidth limit that makes the answer take
seconds, connections reset on arrival or mid-answer, and a blackhole that
accepts connections and never answers, first with as many callers as the
bulkhead has slots, then with twice as many. The breaker is kept out of the
way (it would turn everything into fast CIRCUIT_OPEN refusals) and retries
are not budgeted, so timeouts, retries and the bulkhead are what is measured.

Asserted: no caller waits past its overall timeout_ms + a small margin in any
phase (max latency seen by callers); each fault shows up as what it is
(TIMEOUT, NETWORK); with a hung upstream and more callers than slots the
bulkhead sheds (BULKHEAD_FULL) instead of piling up threads. Two more tests
pin bugs these scenarios found, now fixed: a caller that waited for a bulkhead
slot is not kept past its deadline, and an attempt abandoned against a
trickling upstream frees its slot soon after its timeout.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest

from chaos_support import percentile, record, upstream  # noqa: F401 - upstream is a fixture
from integrations.errors import ResilienceError
from integrations.http import Client
from integrations.resilience import Engine, Policy, use_engine
from integrations.resilience.events import EventBus
from integrations.resilience.registry import PolicyRegistry
from proxy import FaultProxy

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(90)]

CALLERS = 8  # as many as the bulkhead's slots: only attempts abandoned at their timeout can fill it
PHASE_S = 1.5
MARGIN_S = 0.5  # scheduling slack on a busy 2-core machine: a bound on behaviour, not a speed target

SLOW = Policy(
    name="slow", max_retries=2, base_delay_ms=50, max_delay_ms=100, attempt_timeout_ms=300, timeout_ms=1000,
    max_concurrent=CALLERS, bulkhead_wait_ms=0, failure_threshold=10**6, failure_rate_threshold=0,
    slow_call_rate_threshold=0, retry_budget_percent=None)

# (name, faults, callers): as many callers as slots, except in the last phase
PHASES = [
    ("none", {}, CALLERS),
    ("latency 500 ms per chunk", {"latency_s": 0.5}, CALLERS),
    ("bandwidth 2 KiB/s in 256-byte slices", {"bandwidth_bps": 2048}, CALLERS),
    ("reset on arrival", {"reset": True}, CALLERS),
    ("reset after 1 KiB", {"reset_after_bytes": 1024}, CALLERS),
    ("blackhole", {"blackhole": True}, CALLERS),
    ("blackhole, twice the callers", {"blackhole": True}, 2 * CALLERS),
]
PATH = "/bytes?n=8192"


@pytest.fixture
def proxy(upstream):
    server = FaultProxy(upstream.port).start()
    yield server
    server.stop()


def engine_with(policy: Policy) -> Engine:
    registry = PolicyRegistry()
    registry.put(policy)
    return Engine(registry=registry, bus=EventBus())


def run_phase(url: str, callers: int, seconds: float) -> list[tuple[float, str]]:
    """``callers`` threads calling PATH in a loop for ``seconds``; (latency, outcome) per call."""
    outcomes, stop = [], threading.Event()
    lock = threading.Lock()
    ready = threading.Barrier(callers + 1)

    def caller():
        with Client("slow", base_url=url) as client:
            ready.wait(30)  # clients built (slow on a busy machine): the phase starts for all at once
            while True:
                started = time.monotonic()
                try:
                    client.get(PATH)
                    outcome = "ok"
                except ResilienceError as exc:
                    outcome = exc.category.value
                with lock:
                    outcomes.append((time.monotonic() - started, outcome))
                if stop.is_set():
                    break
                time.sleep(0.005)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    ready.wait(30)
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(SLOW.timeout_ms / 1000 + 5)
    assert not any(thread.is_alive() for thread in threads), "a caller is still waiting long past its deadline"
    return outcomes


def test_timeouts_are_honoured_and_the_bulkhead_sheds_behind_a_slow_then_hung_upstream(proxy):
    engine = engine_with(SLOW)
    url = f"http://127.0.0.1:{proxy.port}"
    measured = {}
    with use_engine(engine):
        for name, faults, callers in PHASES:
            proxy.set(**faults)
            before = dict(proxy.stats)
            outcomes = run_phase(url, callers, PHASE_S)
            callers_done = time.monotonic()
            while engine.in_flight("slow") and time.monotonic() - callers_done < 15:
                time.sleep(0.01)  # abandoned attempts end and free their slots before the next phase
            latencies = [latency for latency, _ in outcomes]
            measured[name] = {
                "callers": callers,
                "calls": len(outcomes),
                "outcomes": dict(collections.Counter(outcome for _, outcome in outcomes)),
                "latency_ms": {"p50": round(percentile(latencies, 0.5) * 1000), "p99":
                               round(percentile(latencies, 0.99) * 1000), "max": round(max(latencies) * 1000)},
                "connections": {k: v - before.get(k, 0) for k, v in proxy.stats.items() if v != before.get(k, 0)},
            }
    proxy.clear()

    calls = sum(m["calls"] for m in measured.values())
    worst = max(m["latency_ms"]["max"] for m in measured.values())
    failed = sum(n for m in measured.values() for outcome, n in m["outcomes"].items() if outcome != "ok")
    record(
        "slow_upstream",
        command=".venv/bin/python -m pytest tests/chaos/test_slow_upstream.py",
        load=f"{CALLERS} caller threads ({2 * CALLERS} in the last phase), "
             f"{calls / (PHASE_S * len(PHASES)):.0f} guarded calls/s, {len(PHASES)} phases of {PHASE_S} s",
        faults="through tests/chaos/proxy.py: " + "; ".join(name for name, _, _ in PHASES[1:]),
        policy={"attempt_timeout_ms": SLOW.attempt_timeout_ms, "timeout_ms": SLOW.timeout_ms,
                "max_retries": SLOW.max_retries, "max_concurrent": SLOW.max_concurrent,
                "bulkhead_wait_ms": SLOW.bulkhead_wait_ms},
        calls=calls,
        requests_failed=failed,
        requests_failed_note="every failure is an injected fault's, turned into a bounded, classified error",
        max_latency_ms=worst,
        deadline_ms=SLOW.timeout_ms,
        phases=measured,
        data_lost=0,
    )

    for name, m in measured.items():
        assert m["latency_ms"]["max"] <= SLOW.timeout_ms + MARGIN_S * 1000, (name, m)
    assert set(measured["none"]["outcomes"]) == {"ok"}  # no fault, no failure, and no shedding: slots suffice
    assert set(measured["latency 500 ms per chunk"]["outcomes"]) <= {"timeout", "bulkhead_full"}
    assert measured["latency 500 ms per chunk"]["outcomes"].get("timeout", 0) > 0
    # a trickling answer is cut at the attempt's timeout; retries may still find every slot taken
    assert set(measured["bandwidth 2 KiB/s in 256-byte slices"]["outcomes"]) <= {"timeout", "bulkhead_full"}
    # a reset is a NETWORK error. When the machine stalls an attempt past its 300 ms before the reset arrives,
    # it is rightly a TIMEOUT, and the caller's retry may find the slot still held by that abandoned attempt
    # (BULKHEAD_FULL), as in the phases above. Seen in CI on a busy 2-core machine: 1 of 118 calls, and
    # 1 + 7 of 84; the calls stay bounded (the latency check above) and are mostly NETWORK errors.
    for name in ("reset on arrival", "reset after 1 KiB"):
        outcomes = measured[name]["outcomes"]
        assert set(outcomes) <= {"network", "timeout", "bulkhead_full"}, name
        assert outcomes.get("network", 0) >= 0.8 * measured[name]["calls"], (name, outcomes)
    # hung: calls time out (an abandoned attempt ends with its httpx timeout, give or take a retry that finds
    # its own previous attempt still holding the slot); with twice the callers the bulkhead sheds the excess
    # instead of piling up threads
    hung, twice = measured["blackhole"]["outcomes"], measured["blackhole, twice the callers"]["outcomes"]
    assert set(hung) <= {"timeout", "bulkhead_full"} and hung.get("timeout", 0) > hung.get("bulkhead_full", 0)
    assert set(twice) <= {"timeout", "bulkhead_full"} and twice.get("bulkhead_full", 0) > 0
    assert engine.in_flight("slow") == 0  # every abandoned attempt ended and gave its slot back




def test_a_caller_that_waited_for_a_bulkhead_slot_is_not_kept_past_its_deadline(proxy):
    policy = Policy(name="slow", max_retries=0, attempt_timeout_ms=1500, timeout_ms=1500, max_concurrent=1,
                    bulkhead_wait_ms=1400, failure_threshold=10**6, failure_rate_threshold=0)
    proxy.set(blackhole=True)
    url = f"http://127.0.0.1:{proxy.port}"
    waited = {}

    def call(name):
        with Client("slow", base_url=url) as client:
            started = time.monotonic()
            try:
                client.get("/ok")
            except ResilienceError as exc:
                waited[name] = (time.monotonic() - started, exc.category.value)

    engine = engine_with(policy)
    with use_engine(engine):
        first = threading.Thread(target=call, args=("holds the slot",))
        first.start()
        deadline = time.monotonic() + 5
        while not engine.in_flight("slow") and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.3)  # the second caller arrives while the first holds the only slot until its timeout
        call("waits for the slot")
        first.join(5)
    latency, category = waited["waits for the slot"]
    assert category == "timeout"  # it got the slot after waiting, then its attempt hung
    assert latency <= policy.timeout_ms / 1000 + 0.25, f"kept {latency:.2f} s with a {policy.timeout_ms} ms deadline"




def test_an_attempt_abandoned_against_a_trickling_upstream_frees_its_slot_soon_after_its_timeout(proxy):
    policy = Policy(name="slow", max_retries=0, attempt_timeout_ms=300, timeout_ms=1000, failure_rate_threshold=0)
    proxy.set(bandwidth_bps=8192)  # 64 KiB take 8 s; each read gets bytes well within 300 ms
    engine = engine_with(policy)
    with use_engine(engine), Client("slow", base_url=f"http://127.0.0.1:{proxy.port}") as client:
        started = time.monotonic()
        with pytest.raises(ResilienceError) as raised:
            client.get("/bytes?n=65536")
        assert raised.value.category.value == "timeout"
        assert time.monotonic() - started <= 0.3 + MARGIN_S  # the caller is not kept waiting...
        time.sleep(1.0)
        held = engine.in_flight("slow")
        proxy.stop()  # ends the trickle, so the client can close
    assert held == 0, f"{held} slot still held 1 s after the attempt was abandoned"
