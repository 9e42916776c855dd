"""Per-call overhead of the guarded-call pipeline, next to pybreaker and tenacity.

    .venv/bin/python benchmarks/bench_overhead.py [--quick] [--json FILE]

Every row calls the same no-op operation (``op() -> 1``) N times in a loop
and reports microseconds per call:

    baseline            op() called directly
    pybreaker           CircuitBreaker(fail_max=5, reset_timeout=30).call(op)
    tenacity            a function decorated with @retry(stop_after_attempt(4),
                        wait_exponential_jitter(multiplier=0.5, max=10),
                        retry_if_exception_type((OSError, TimeoutError)))
                        that returns op(): what a user writes
    tenacity+pybreaker  the same @retry function returning breaker.call(op)
    ours                engine.execute("bench", op): PolicyRegistry, LocalStore,
                        SystemClock, inline timeouts, 3 retries, quota,
                        bulkhead and breaker on, no cache, an EventBus without
                        subscribers (events off)
    ours +1 subscriber  the same with one no-op CallFinished subscriber
    ours module execute integrations.resilience.execute("bench", op) under
                        use_engine(): the process-engine lookup on top of "ours"
    ours rate limited   "ours" with an outbound rate limit (rate_limit_permits=10^9 per
                        second, never reached): every attempt counted in this process's
                        sliding window (issue 15: what the rate limiter costs when on)
    ours time window    "ours" with window_type="time", window_duration_s=60: the
                        breaker's rates over the last 60 s, each call counted in
                        its one-second bucket (issue 15: what the time window costs)
    ours hedged         "ours" with hedge_delay_ms=5000 (never reached): hedging runs the
                        attempt in a worker thread (N/10 calls)
    ours call_options   "ours" with call_options=CallOptions(max_retries=2): the policy
                        overridden for the call (a replaced, validated Policy per call)
    ours adaptive       "ours" with bulkhead_mode="adaptive": the bulkhead's limit follows
                        the observed latency (each call measured and fed to the limit)
    ours retry on result "ours" with call_options=CallOptions(retry_if_result=...), a
                        predicate that never asks for a retry: the value checked per attempt
    ours thread timeout the same policy with timeout_enforcement="thread": each
                        attempt is handed to a worker thread (N/10 calls)
    ours traced (API)   "ours" with RESILIENCE_TRACING on and only opentelemetry-api
                        (no SDK: non-recording spans)
    ours traced (SDK)   "ours" with tracing on into the OpenTelemetry SDK, a
                        BatchSpanProcessor and an exporter that drops the spans:
                        two real spans per call, what a traced site pays (N/10)
    open: ours          engine.execute on a tripped breaker: ok=False, CIRCUIT_OPEN
    open: pybreaker     breaker.call(op) on a tripped breaker, raising
                        CircuitBreakerError (caught)

Async rows (a second table, run the same way inside one event loop):

    async baseline      await aop() (an async no-op returning 1)
    tenacity+purgatory  an @retry-decorated coroutine (tenacity's AsyncRetrying,
                        the same stop/wait/retry as above) that awaits aop()
                        inside purgatory's async breaker (threshold 5, ttl 30)
    ours aexecute       await engine.aexecute("bench", aop): the same policy

Method: each repeat runs every row once, in turn, so machine noise falls on
all rows alike; gc.collect() runs before each row and gc is off while it is
timed. The figure kept per row is the best (minimum) of the repeats.

Columns: "us/call" is the raw best time, loop included; "overhead" subtracts
the baseline row, which is what the wrapper itself costs; "x stacked" is
overhead / the overhead of tenacity+pybreaker. Both targets compare overheads:

    (a) ours (no events) <= 0.5 x tenacity+pybreaker
    (b) open-breaker fail-fast: ours < pybreaker
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import functools
import os
import platform
import sys
import time
from importlib.metadata import version
from itertools import repeat
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "resilience_site.settings")

import django  # noqa: E402

django.setup()

import pybreaker  # noqa: E402
import purgatory  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter  # noqa: E402

from integrations import resilience  # noqa: E402
from integrations.errors import ErrorCategory  # noqa: E402
from integrations.resilience import CallOptions, Engine, Policy, use_engine  # noqa: E402
from integrations.resilience.cache import ResponseCache  # noqa: E402
from integrations.resilience.clock import SystemClock  # noqa: E402
from integrations.resilience.events import CallFinished, EventBus  # noqa: E402
from integrations.resilience.registry import PolicyRegistry  # noqa: E402
from integrations.resilience.state import LocalStore  # noqa: E402
from integrations.resilience.tracing import Tracing  # noqa: E402

REPEATS = 5
STACKED = "tenacity+pybreaker"
OURS = "ours (events off)"
OPEN_OURS = "open: ours"
OPEN_PYBREAKER = "open: pybreaker"
BENCH_POLICY = Policy(name="bench", timeout_enforcement="inline", max_retries=3, hourly_limit=10**9,
                      daily_limit=10**9, max_concurrent=100, cache_ttl_s=0)


def op():
    return 1


def broken():
    raise ValueError("upstream bug")  # not retryable, counts as a breaker failure: one call trips it


class DroppingExporter(SpanExporter):
    """An exporter that sends nowhere: the spans' cost without a collector's."""

    def export(self, spans) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def build_engine(policy: Policy, bus: EventBus | None = None) -> Engine:
    registry = PolicyRegistry()
    registry.put(policy)
    clock = SystemClock()
    return Engine(registry=registry, store=LocalStore(clock), cache=ResponseCache(), clock=clock,
                  bus=bus or EventBus())


def tenacity_retry():
    return retry(stop=stop_after_attempt(4), wait=wait_exponential_jitter(multiplier=0.5, max=10),
                 retry=retry_if_exception_type((OSError, TimeoutError)))


def build_rows(n: int):
    """(name, calls, fn, args) per row, each checked once so a row never times the wrong path."""
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)

    @tenacity_retry()
    def tenacity_op():
        return op()

    @tenacity_retry()
    def stacked_op():
        return breaker.call(op)

    ours = build_engine(BENCH_POLICY)
    with_subscriber = EventBus()
    with_subscriber.subscribe(CallFinished, lambda event: None)
    ours_events = build_engine(BENCH_POLICY, with_subscriber)
    ours_thread = build_engine(BENCH_POLICY.replace(timeout_enforcement="thread"))
    ours_rate_limited = build_engine(BENCH_POLICY.replace(rate_limit_permits=10**9, rate_limit_period_s=1.0))
    with_options = functools.partial(ours.execute, call_options=CallOptions(max_retries=2))
    ours_hedged = build_engine(BENCH_POLICY.replace(hedge_delay_ms=5_000))
    ours_adaptive = build_engine(BENCH_POLICY.replace(bulkhead_mode="adaptive"))
    on_result = functools.partial(ours.execute, call_options=CallOptions(retry_if_result=lambda value: value is None))
    ours_time_window = build_engine(BENCH_POLICY.replace(window_type="time", window_duration_s=60))
    ours_traced_api = build_engine(BENCH_POLICY)
    ours_traced_api.tracing = Tracing(tracer_provider=trace.NoOpTracerProvider())
    sdk = TracerProvider()
    sdk.add_span_processor(BatchSpanProcessor(DroppingExporter()))
    ours_traced_sdk = build_engine(BENCH_POLICY)
    ours_traced_sdk.tracing = Tracing(tracer_provider=sdk)

    open_ours = build_engine(BENCH_POLICY.replace(failure_threshold=1, reset_timeout_s=1e9))
    open_ours.execute("bench", broken)
    open_pybreaker = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=1e9)
    try:
        open_pybreaker.call(broken)
    except (ValueError, pybreaker.CircuitBreakerError):
        pass

    rows = [
        ("baseline", n, op, ()),
        ("pybreaker", n, breaker.call, (op,)),
        ("tenacity", n, tenacity_op, ()),
        (STACKED, n, stacked_op, ()),
        (OURS, n, ours.execute, ("bench", op)),
        ("ours (+1 subscriber)", n, ours_events.execute, ("bench", op)),
        ("ours module execute", n, resilience.execute, ("bench", op)),
        ("ours rate limited", n, ours_rate_limited.execute, ("bench", op)),
        ("ours call_options", n, with_options, ("bench", op)),
        ("ours time window", n, ours_time_window.execute, ("bench", op)),
        ("ours adaptive", n, ours_adaptive.execute, ("bench", op)),
        ("ours retry on result", n, on_result, ("bench", op)),
        ("ours hedged", n // 10, ours_hedged.execute, ("bench", op)),
        ("ours thread timeout", n // 10, ours_thread.execute, ("bench", op)),
        ("ours traced (API)", n, ours_traced_api.execute, ("bench", op)),
        ("ours traced (SDK)", n // 10, ours_traced_sdk.execute, ("bench", op)),
        (OPEN_OURS, n, open_ours.execute, ("bench", op)),
        (OPEN_PYBREAKER, n, open_pybreaker.call, (op,)),
    ]
    with use_engine(ours):
        for name, _, fn, args in rows:
            check(name, fn, args)
    return rows, ours


def check(name, fn, args) -> None:
    if name == OPEN_PYBREAKER:
        try:
            fn(*args)
        except pybreaker.CircuitBreakerError:
            return
        raise AssertionError("pybreaker's breaker is not open")
    result = fn(*args)
    if name == OPEN_OURS:
        assert not result.ok and result.error.category == ErrorCategory.CIRCUIT_OPEN, result
    elif name.startswith("ours"):
        assert result.ok and result.value == 1 and result.attempts == 1, result
    else:
        assert result == 1, (name, result)


def time_row(fn, args, calls: int) -> float:
    """Microseconds per call of fn(*args) over one timed loop."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter_ns()
        for _ in repeat(None, calls):
            try:
                fn(*args)
            except pybreaker.CircuitBreakerError:
                pass
        elapsed = time.perf_counter_ns() - started
    finally:
        gc.enable()
    return elapsed / calls / 1000


def measure(rows) -> dict[str, list[float]]:
    times = {name: [] for name, *_ in rows}
    for _ in range(REPEATS):
        for name, calls, fn, args in rows:
            times[name].append(time_row(fn, args, calls))
    return times


def summarize(rows, times) -> dict:
    best = {name: min(samples) for name, samples in times.items()}
    overhead = {name: us - best["baseline"] for name, us in best.items()}
    stacked = overhead[STACKED]
    figures = {
        name: {
            "calls": calls,
            "us_per_call": best[name],
            "overhead_us": overhead[name],
            "x_stacked": None if name == "baseline" or name.startswith("open") else overhead[name] / stacked,
            "samples_us": times[name],
        }
        for name, calls, *_ in rows
    }
    fail_fast_ratio = overhead[OPEN_OURS] / overhead[OPEN_PYBREAKER]
    return {
        "figures": figures,
        "fail_fast_ratio": fail_fast_ratio,
        "targets": {
            "a_ours_le_half_stacked": figures[OURS]["x_stacked"] <= 0.5,
            "b_fail_fast_faster_than_pybreaker": fail_fast_ratio < 1,
        },
    }


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "pybreaker": version("pybreaker"),
        "tenacity": version("tenacity"),
        "purgatory": version("purgatory"),
    }


# -- async: aexecute next to tenacity's AsyncRetrying around purgatory's async breaker -------------

ASYNC_STACKED = "tenacity+purgatory"
ASYNC_OURS = "ours aexecute"


async def aop():
    return 1


async def build_async_rows(n: int):
    breakers = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
    await breakers.initialize()

    @tenacity_retry()
    async def stacked_aop():
        async with await breakers.get_breaker("bench"):
            return await aop()

    ours = build_engine(BENCH_POLICY)
    rows = [("async baseline", n, aop, ()), (ASYNC_STACKED, n, stacked_aop, ()),
            (ASYNC_OURS, n, ours.aexecute, ("bench", aop))]
    for name, _, fn, args in rows:
        result = await fn(*args)
        assert (result.ok and result.value == 1) if name == ASYNC_OURS else result == 1, (name, result)
    return rows


async def atime_row(fn, args, calls: int) -> float:
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter_ns()
        for _ in repeat(None, calls):
            await fn(*args)
        elapsed = time.perf_counter_ns() - started
    finally:
        gc.enable()
    return elapsed / calls / 1000


async def ameasure(n: int) -> dict:
    rows = await build_async_rows(n)
    times = {name: [] for name, *_ in rows}
    for _ in range(REPEATS):
        for name, calls, fn, args in rows:
            times[name].append(await atime_row(fn, args, calls))
    best = {name: min(samples) for name, samples in times.items()}
    overhead = {name: us - best["async baseline"] for name, us in best.items()}
    return {name: {"calls": n, "us_per_call": best[name], "overhead_us": overhead[name],
                   "x_stacked": None if name == "async baseline" else overhead[name] / overhead[ASYNC_STACKED],
                   "samples_us": times[name]} for name in times}


def report(summary: dict, about: dict, n: int) -> None:
    print(f"Python {about['python']} ({about['implementation']}) on {about['platform']}, "
          f"{about['processor']}, {about['cpu_count']} CPUs; "
          f"pybreaker {about['pybreaker']}, tenacity {about['tenacity']}")
    print(f"N={n} calls per row ({n // 10} for the thread and SDK-traced rows), best of {REPEATS} interleaved repeats\n")
    print(f"{'row':<22}{'calls':>8}{'us/call':>10}{'overhead':>10}{'x stacked':>11}")
    for name, row in summary["figures"].items():
        ratio = "" if row["x_stacked"] is None else f"{row['x_stacked']:.2f}"
        print(f"{name:<22}{row['calls']:>8}{row['us_per_call']:>10.3f}{row['overhead_us']:>10.3f}{ratio:>11}")
    figures, targets = summary["figures"], summary["targets"]
    print(f"\nfail-fast ratio ours/pybreaker: {summary['fail_fast_ratio']:.2f}")
    print(f"(a) ours (events off) <= 0.5 x stacked: {figures[OURS]['x_stacked']:.2f} -> "
          f"{'PASS' if targets['a_ours_le_half_stacked'] else 'FAIL'}")
    print(f"(b) fail-fast ours < pybreaker: {figures[OPEN_OURS]['overhead_us']:.3f} vs "
          f"{figures[OPEN_PYBREAKER]['overhead_us']:.3f} us -> "
          f"{'PASS' if targets['b_fail_fast_faster_than_pybreaker'] else 'FAIL'}")
    print(f"\nasync (tenacity {about['tenacity']} AsyncRetrying, purgatory {about['purgatory']}):")
    print(f"{'row':<22}{'calls':>8}{'us/call':>10}{'overhead':>10}{'x stacked':>11}")
    for name, row in summary["async"].items():
        ratio = "" if row["x_stacked"] is None else f"{row['x_stacked']:.2f}"
        print(f"{name:<22}{row['calls']:>8}{row['us_per_call']:>10.3f}{row['overhead_us']:>10.3f}{ratio:>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 calls per row instead of 200,000")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    options = parser.parse_args()
    n = 20_000 if options.quick else 200_000

    rows, ours = build_rows(n)
    with use_engine(ours):
        times = measure(rows)
    summary = summarize(rows, times)
    summary["async"] = asyncio.run(ameasure(n))
    about = machine()
    report(summary, about, n)
    if options.json:
        Path(options.json).write_text(json.dumps({"machine": about, "n": n, "repeats": REPEATS, **summary},
                                                 indent=2))


if __name__ == "__main__":
    main()
