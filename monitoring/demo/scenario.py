"""What the demo runs: its upstream routes, its integrations, the traffic and what the console says.

Three integrations, each showing other patterns against the simulated upstream:

- ``demo-payments`` (external_api): charges, posted through ``execute`` with
  a dead letter. The payments route has a scheduled outage, and the breaker
  is tight (3 failures, a short reset timeout), so within the first half
  minute it opens, half-opens, fails its trial, and closes once the route is
  back; every charge that failed or was refused lands in the dead letter
  queue (handler ``demo.charge``).
- ``demo-quotes`` (market_data): quotes through ``integrations.http.Client``,
  cached for 2 s, with a small hourly quota that fills within a minute; then
  ``Fallback.last_known()`` serves the last good quote.
- ``demo-llm`` (ai_service): slow completions (most slower than its slow-call
  threshold, a few past their timeout or failing) through the Client, from
  more threads than the bulkhead admits: the excess is shed and
  ``Fallback.value`` answers.

All timings are in ``Timing``, so tests can run the same scenario fast.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace

import httpx
from django.db import connections

from integrations.dlq import DeadLetter
from integrations.errors import ResilienceError
from integrations.http import Client
from integrations.resilience import Fallback, execute
from integrations.resilience.events import CallFinished, DeadLetterRequested, StateTransition

from .handlers import CHARGE_HANDLER, PAYMENTS, charge
from .upstream import Outage, RouteFaults, SimulatedUpstream

QUOTES = "demo-quotes"
LLM = "demo-llm"
NAMES = (PAYMENTS, QUOTES, LLM)
SYMBOLS = ("ACME", "GLOBEX", "INITECH", "UMBRELLA")
BUSY_REPLY = {"text": "The assistant is busy; here is a canned answer instead.", "fallback": True}


@dataclass(frozen=True)
class Timing:
    """Every duration of the demo, in seconds unless named otherwise."""

    payments_pause_s: float = 0.5  # each payments worker's pause between charges
    call_pause_s: float = 0.25  # each quotes and llm worker's pause between calls
    status_every_s: float = 5.0
    watchdog_every_s: float = 10.0
    outage_start_s: float = 6.0  # the payments route is down from start to end of every cycle
    outage_end_s: float = 18.0
    outage_every_s: float = 45.0
    payments_reset_timeout_s: float = 4.0  # how long demo-payments' breaker stays open before a trial
    quotes_hourly_limit: int = 60
    llm_latency_ms: float = 300.0  # plus up to llm_jitter_ms
    llm_jitter_ms: float = 1200.0

    def faster(self, factor: float) -> Timing:
        """The same scenario ``factor`` times faster (the quota is left as it is)."""
        return replace(self, **{name: getattr(self, name) / factor for name in (
            "payments_pause_s", "call_pause_s", "status_every_s", "watchdog_every_s", "outage_start_s",
            "outage_end_s", "outage_every_s", "payments_reset_timeout_s", "llm_latency_ms", "llm_jitter_ms")})

    def describe(self) -> str:
        return (f"payments down {self.outage_start_s:g}-{self.outage_end_s:g} s of every {self.outage_every_s:g} s; "
                f"quotes 5% errors, {self.quotes_hourly_limit} calls an hour; "
                f"llm {self.llm_latency_ms:g}-{self.llm_latency_ms + self.llm_jitter_ms:g} ms, 10% errors")


# -- the upstream ----------------------------------------------------------------------------

def build_upstream(timing: Timing, port: int = 0) -> SimulatedUpstream:
    """The simulated upstream with the demo's three routes (not started)."""
    upstream = SimulatedUpstream(port)
    charges = itertools.count(1)

    def captured(method, path, body):
        return 201, {"charge": f"ch_{next(charges)}", "status": "captured",
                     "order": body.get("order") if isinstance(body, dict) else None}

    def quote(method, path, body):
        symbol = path.rsplit("/", 1)[-1].upper()
        # a price that moves with time: the console shows live and last known quotes differ
        price = 100 + 10 * math.sin(time.time() / 30 + len(symbol))
        return 200, {"symbol": symbol, "price": round(price, 2), "at": time.time()}

    def completion(method, path, body):
        prompt = body.get("prompt", "") if isinstance(body, dict) else ""
        return 200, {"text": f"A thoughtful answer to {prompt!r}.", "fallback": False}

    upstream.add_route("/payments", RouteFaults(
        latency_ms=30, latency_jitter_ms=50,
        outages=(Outage(timing.outage_start_s, timing.outage_end_s, every_s=timing.outage_every_s),),
    ), captured)
    upstream.add_route("/quotes", RouteFaults(error_rate=0.05, error_status=502, latency_ms=20,
                                              latency_jitter_ms=60), quote)
    upstream.add_route("/llm", RouteFaults(error_rate=0.1, error_status=503, latency_ms=timing.llm_latency_ms,
                                           latency_jitter_ms=timing.llm_jitter_ms), completion)
    return upstream


# -- the integrations --------------------------------------------------------------------------

def integration_entries(timing: Timing) -> list[dict]:
    """The demo integrations, as ``manage.py integrations import`` entries (knobs not given: the kind's preset)."""
    return [
        {
            "name": PAYMENTS, "kind": "external_api", "mode": "normal",
            "description": "Demo: a payments API with scheduled outages; failed charges go to the dead letter queue.",
            "failure_threshold": 3, "failure_rate_threshold": 50.0, "window_size": 10, "minimum_calls": 5,
            "reset_timeout_s": timing.payments_reset_timeout_s, "half_open_max_calls": 1, "success_threshold": 2,
            "max_retries": 1, "base_delay_ms": 100, "max_delay_ms": 400, "attempt_timeout_ms": 1000,
            "timeout_ms": 2500, "slow_call_ms": 800, "max_concurrent": 10, "bulkhead_wait_ms": 0,
            "hourly_limit": None, "daily_limit": None, "cache_ttl_s": 0, "capacity": 1.0,
        },
        {
            "name": QUOTES, "kind": "market_data", "mode": "normal",
            "description": "Demo: market quotes, cached for 2 s, with a small hourly quota; last known quotes "
                           "are served when it is spent.",
            "hourly_limit": timing.quotes_hourly_limit, "daily_limit": None, "cache_ttl_s": 2,
            "max_retries": 1, "base_delay_ms": 100, "max_delay_ms": 500, "attempt_timeout_ms": 1000,
            "timeout_ms": 3000, "capacity": 1.0,
        },
        {
            "name": LLM, "kind": "ai_service", "mode": "normal",
            "description": "Demo: a slow LLM; its bulkhead admits 2 calls at once and sheds the rest to a "
                           "canned answer.",
            "max_concurrent": 2, "bulkhead_wait_ms": 100, "attempt_timeout_ms": 1400, "timeout_ms": 4000,
            "max_retries": 1, "base_delay_ms": 200, "max_delay_ms": 1000, "slow_call_ms": 700,
            "failure_threshold": 5, "failure_rate_threshold": 50.0, "window_size": 20, "minimum_calls": 20,
            "reset_timeout_s": 10.0,
            "hourly_limit": None, "daily_limit": None, "cache_ttl_s": 0, "capacity": 1.0,
        },
    ]


# -- what happened: counted from the engine's events -----------------------------------------

class Tally:
    """Counts the demo integrations' calls, breaker transitions and dead letters from the engine's events."""

    def __init__(self, names=NAMES) -> None:
        self._lock = threading.Lock()
        self.counts = {name: Counter() for name in names}
        # bound once: the bus unsubscribes by identity
        self.handlers = ((CallFinished, self.on_call), (StateTransition, self.on_transition),
                         (DeadLetterRequested, self.on_dead_letter))

    def subscribe(self, bus) -> None:
        for event_type, handler in self.handlers:
            bus.subscribe(event_type, handler)

    def unsubscribe(self, bus) -> None:
        for event_type, handler in self.handlers:
            bus.unsubscribe(event_type, handler)

    def _add(self, name: str, *keys: str) -> None:
        counts = self.counts.get(name)
        if counts is None:
            return
        with self._lock:
            for key in keys:
                counts[key] += 1

    def on_call(self, event: CallFinished) -> None:
        # every call is counted once as live (answered by the upstream), cache, fallback or failed
        keys = ["calls", event.source if event.ok else "failed"]
        if event.category:
            keys.append(event.category)
        if event.fallback_used:
            keys.append("fallbacks")
        self._add(event.integration, *keys)

    def on_transition(self, event: StateTransition) -> None:
        self._add(event.transition.integration, f"to_{event.transition.to_state}")

    def on_dead_letter(self, event: DeadLetterRequested) -> None:
        self._add(event.integration, "dead_letters")

    def snapshot(self) -> dict[str, Counter]:
        with self._lock:
            return {name: Counter(counts) for name, counts in self.counts.items()}


ANSWERS = (("live", "live"), ("cache", "cached"), ("fallback", "fallback"), ("failed", "failed"))
EVENTS = (("to_open", "opened"), ("to_half_open", "half-opened"), ("to_closed", "closed"),
          ("circuit_open", "refused (open)"), ("quota_exceeded", "over quota"), ("bulkhead_full", "shed"),
          ("timeout", "timeouts"), ("server_error", "upstream 5xx"), ("network", "network errors"),
          ("dead_letters", "dead letters"))


def integration_summary(counts: Counter) -> str:
    """``42 calls: 30 live, 12 failed; breaker opened 1, ...``: how calls were answered, then what happened."""
    answered = ", ".join(f"{counts[key]} {label}" for key, label in ANSWERS if counts[key])
    happened = ", ".join(f"{label} {counts[key]}" for key, label in EVENTS if counts[key])
    return f"{counts['calls']} calls" + (f": {answered}" if answered else "") + (f"; {happened}" if happened else "")


# -- the traffic ---------------------------------------------------------------------------------

class Traffic:
    """The worker threads calling the demo integrations until ``stop`` is set.

    A worker that fails on something other than an integration's failure (a
    bug, the database gone) records the exception and stops the demo.
    """

    WORKERS = ((PAYMENTS, 2), (QUOTES, 2), (LLM, 3))

    def __init__(self, upstream_url: str, timing: Timing, stop: threading.Event) -> None:
        self.url = upstream_url
        self.timing = timing
        self.stop = stop
        self.run_id = uuid.uuid4().hex[:8]
        self.orders = itertools.count(1)
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self) -> None:
        loops = {PAYMENTS: self.payments, QUOTES: self.quotes, LLM: self.llm}
        for name, count in self.WORKERS:
            for index in range(count):
                thread = threading.Thread(target=self._run, args=(loops[name], index), name=f"{name}-{index}",
                                          daemon=True)
                thread.start()
                self.threads.append(thread)

    def join(self, timeout_s: float = 30.0) -> list[str]:
        """Wait for every worker (they stop after their current call); the names of any still running."""
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(deadline - time.monotonic(), 0))
        return [thread.name for thread in self.threads if thread.is_alive()]

    def _run(self, loop, index: int) -> None:
        try:
            loop(index)
        except BaseException as exc:  # noqa: BLE001 - reported by the command, which stops the demo
            self.errors.append(exc)
            self.stop.set()
        finally:
            connections.close_all()  # this thread's database connections (dead letters, breaker events)

    def payments(self, index: int) -> None:
        while not self.stop.is_set():
            number = next(self.orders)
            order = f"{self.run_id}-{number}"
            payload = {"order": order, "amount_cents": 100 * (1 + number % 50), "upstream": self.url}
            execute(PAYMENTS, charge, payload, cache_key=False,
                    dead_letter=DeadLetter(CHARGE_HANDLER, payload, idempotency_key=f"demo-charge-{order}",
                                           max_redrives=5))
            self.stop.wait(self.timing.payments_pause_s)

    def quotes(self, index: int) -> None:
        symbols = itertools.cycle(SYMBOLS[index % 2:] + SYMBOLS[:index % 2])
        with Client(QUOTES, base_url=self.url, fallbacks=(Fallback.last_known(),)) as client:
            while not self.stop.is_set():
                try:
                    client.get(f"/quotes/{next(symbols)}")
                except ResilienceError:
                    pass  # counted from the engine's events
                self.stop.wait(self.timing.call_pause_s)

    def llm(self, index: int) -> None:
        busy = httpx.Response(200, json=BUSY_REPLY)
        with Client(LLM, base_url=self.url, fallbacks=(Fallback.value(busy),)) as client:
            for n in itertools.count(1):
                if self.stop.is_set():
                    return
                try:
                    client.post("/llm/complete", json={"prompt": f"question {n} from worker {index}"})
                except ResilienceError:
                    pass  # counted from the engine's events
                self.stop.wait(self.timing.call_pause_s)
