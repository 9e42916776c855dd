"""A guarded call with shared state in Redis, next to one raw round trip and pybreaker's Redis storage.

    .venv/bin/python benchmarks/bench_shared_state.py [--redis-url URL] [--calls N] [--json FILE]

URL is any form the store takes (docs/shared-state.md, Topologies): on a Cluster,
``--redis-url redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002`` (.ci/redis-topologies
start runs one) times the raw EVALSHA on the same cluster, with one key so it is routed to a node
as the store's scripts are; pybreaker's storage needs one server and is left out there.

Rows (each a no-op operation, N calls, best of 5 interleaved repeats):

    raw EVALSHA          one EVALSHA of a trivial script ("return 1"): one round trip
    ours, breaker        execute() on the RedisStore: breaker, retry, bulkhead, no quota
    ours, with quota     the same with an hourly and daily limit: the units of quota come
                         from leases taken ahead in Redis (integrations/resilience/leases.py),
                         so a busy integration's calls make a round trip only now and then
    ours, time window    "ours, breaker" with window_type="time" (60 s): its deferred successes are
                         sent by bucket, the first success of each second at once with them
    ours, failing        a failing call (a breaker that never trips): its outcome is recorded in
                         Redis at once, so every call is one state.lua round trip
    ours, failing, time  the same on a time window (60 s): the script reads and writes its buckets
    pybreaker + Redis    pybreaker.CircuitBreaker with CircuitRedisStorage

"round trips" counts the requests written to Redis per call (a pipeline is
one), from redis-py's connection in this process; "x EVALSHA" is time per
call over the raw EVALSHA time. Targets: ours <= 1.05 round trips' worth of
time per call, and >= 2x pybreaker's throughput; with a quota, <= 0.05 round trips per
call and >= 10x pybreaker's throughput (issue 14).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "resilience_site.settings")

import django  # noqa: E402

from redis_writes import counter  # noqa: E402  (benchmarks/, on sys.path as the script's directory)

django.setup()

import pybreaker  # noqa: E402
import redis  # noqa: E402

from integrations.resilience import Engine, Policy  # noqa: E402
from integrations.resilience.events import EventBus  # noqa: E402
from integrations.resilience.redis_connect import CLUSTER, connect, parse_url  # noqa: E402
from integrations.resilience.redis_store import RedisStore  # noqa: E402
from integrations.resilience.registry import PolicyRegistry  # noqa: E402

REPEATS = 5


def op():
    return 1


def failing_op():
    raise ConnectionError("upstream down")


def build_rows(url: str) -> dict:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    on_cluster = parse_url(url).form == CLUSTER
    client = connect(parse_url(url))
    script = client.register_script("return 1")
    # a Cluster routes a script by its keys: one key, as the store's scripts have their integration's
    trivial = (lambda: script(keys=[f"{prefix}:{{raw}}"])) if on_cluster else script
    trivial()  # load it: every timed call is an EVALSHA

    def ours(policy: Policy, operation=op):
        registry = PolicyRegistry()
        registry.put(policy)
        bus = EventBus()
        engine = Engine(registry=registry, store=RedisStore(url, prefix=prefix, bus=bus), bus=bus)
        return lambda: engine.execute(policy.name, operation)

    breaker_only = ours(Policy(name="breaker", timeout_enforcement="inline", max_concurrent=100))
    with_quota = ours(Policy(name="quota", timeout_enforcement="inline", max_concurrent=100,
                             hourly_limit=10**9, daily_limit=10**9))
    time_window = ours(Policy(name="timed", timeout_enforcement="inline", max_concurrent=100, window_type="time",
                              window_duration_s=60))
    failing = ours(Policy(name="failing", timeout_enforcement="inline", max_concurrent=100, max_retries=0,
                          failure_threshold=10**9, failure_rate_threshold=100, minimum_calls=10**9), failing_op)
    failing_time = ours(Policy(name="failing-timed", timeout_enforcement="inline", max_concurrent=100, max_retries=0,
                               failure_threshold=10**9, failure_rate_threshold=100, minimum_calls=10**9,
                               window_type="time", window_duration_s=60), failing_op)
    rows = {
        "raw EVALSHA": trivial,
        "ours, breaker": breaker_only,
        "ours, with quota": with_quota,
        "ours, time window": time_window,
        "ours, failing": failing,
        "ours, failing, time": failing_time,
    }
    if not on_cluster:
        storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, redis.Redis.from_url(url),
                                                namespace=f"{prefix}-pybreaker")
        breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30, state_storage=storage)
        rows["pybreaker + Redis"] = lambda: breaker.call(op)
    return rows, client, prefix


def time_row(fn, calls: int) -> tuple[float, float]:
    """(µs per call, round trips per call)."""
    gc.collect()
    gc.disable()
    try:
        counter.writes = 0
        started = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter_ns() - started
        return elapsed / calls / 1000, counter.writes / calls
    finally:
        gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    rows, client, prefix = build_rows(args.redis_url)
    for fn in rows.values():  # warm up: scripts loaded, connections open, policies seen
        for _ in range(200):
            fn()
    best = {name: (float("inf"), 0.0) for name in rows}
    for _ in range(REPEATS):
        for name, fn in rows.items():
            micros, trips = time_row(fn, args.calls)
            if micros < best[name][0]:
                best[name] = (micros, trips)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)

    raw = best["raw EVALSHA"][0]
    pyb = best.get("pybreaker + Redis", (None,))[0]
    print(f"Redis at {args.redis_url}, {args.calls} calls per row, best of {REPEATS}\n")
    print(f"{'row':20} {'µs/call':>9} {'round trips':>12} {'x EVALSHA':>10} {'calls/s':>9}")
    summary = {}
    for name, (micros, trips) in best.items():
        summary[name] = {"us_per_call": round(micros, 2), "round_trips_per_call": round(trips, 3),
                         "x_evalsha": round(micros / raw, 3), "calls_per_s": round(1e6 / micros)}
        print(f"{name:20} {micros:9.2f} {trips:12.3f} {micros / raw:10.2f} {1e6 / micros:9.0f}")
    print()
    for name in ("ours, breaker", "ours, with quota"):
        micros = best[name][0]
        worth = micros / raw
        against = "" if pyb is None else (
            f", {pyb / micros:.1f}x pybreaker's throughput (target >= 2: {'PASS' if pyb / micros >= 2 else 'FAIL'})")
        print(f"{name}: {worth:.2f} round trips' worth (target <= 1.05: {'PASS' if worth <= 1.05 else 'FAIL'})"
              f"{against}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
