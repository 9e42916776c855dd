"""The response cache: upstream calls saved by stampede protection, invalidation delay across processes,
and the cost of an L1 hit against a shared-cache hit.

    REDIS_URL=redis://127.0.0.1:6379/6 .venv/bin/python benchmarks/bench_cache.py [--json FILE]
        [--trials N] [--processes N] [--upstream-ms MS] [--hits N]

Runs on the site's default cache: Redis with REDIS_URL (what the figures are for: the fill lock and
the invalidation record are shared by OS processes), local memory without it (then only the
in-process figures mean anything, and the script says so). No database is used: the engines are
built on a policy given directly, as the tests' are.

Steps:
1. stampede: for 10 and 100 callers, all missing one cold key at once (a barrier), each calling an
   upstream that takes ``--upstream-ms`` (default 50) and counts its calls in Redis (or in the
   process): (a) threads of one process, (b) the callers spread over ``--processes`` OS processes
   (default 10), each with its own engine and L1. "Without protection" is the same callers through a
   plain cache-aside (get, on a miss call and set) on the same cache: each concurrent miss calls;
2. invalidation delay: ``--processes`` processes serve one key from their L1, reading it in a loop;
   the parent clears it (``ResponseCache.clear``) and each process notes, on the wall clock, when it
   first stops serving the old value. ``--trials`` (default 20) keys, a key clear each; the median
   and worst delay over every process and trial. The bound is ``view_s`` (0.5 s) plus one read;
3. hit cost: µs per ``Engine.execute`` served from the cache, with the L1 (no round trip) and
   without it (``local_entries=0``: one round trip for the entry and the invalidation record), best
   of 5 loops of ``--hits`` calls (default 20,000; 2,000 without the L1).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "resilience_site.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.core.cache import caches  # noqa: E402

from integrations.resilience import Engine, Policy  # noqa: E402
from integrations.resilience.cache import ResponseCache  # noqa: E402
from integrations.resilience.clock import SystemClock  # noqa: E402
from integrations.resilience.events import EventBus  # noqa: E402
from integrations.resilience.registry import PolicyRegistry  # noqa: E402
from integrations.resilience.state import LocalStore  # noqa: E402

FORK = multiprocessing.get_context("fork")
NAME = "bench-cache"
CALLERS = (10, 100)


def engine(local_entries: int = 1024) -> Engine:
    registry = PolicyRegistry()
    registry.put(Policy(name=NAME, cache_ttl_s=600, timeout_ms=10_000, attempt_timeout_ms=10_000, max_retries=0,
                        max_concurrent=1000, timeout_enforcement="inline"))
    clock = SystemClock()
    return Engine(registry=registry, store=LocalStore(clock), cache=ResponseCache(local_entries=local_entries),
                  clock=clock, bus=EventBus())


def on_redis() -> bool:
    return "redis" in settings.CACHES["default"]["BACKEND"].lower()


class Counter:
    """Upstream calls, counted where every process sees them: a Redis key, else a shared integer."""

    def __init__(self, label: str) -> None:
        self.key = f"bench-cache:calls:{label}:{time.time_ns()}"
        self.value = FORK.Value("i", 0)

    def incr(self) -> None:
        if on_redis():
            caches["default"].incr(self.key)
        else:
            with self.value.get_lock():
                self.value.value += 1

    def start(self) -> None:
        if on_redis():
            caches["default"].set(self.key, 0, 600)

    def read(self) -> int:
        return int(caches["default"].get(self.key)) if on_redis() else self.value.value


def upstream(counter: Counter, seconds: float):
    def fetch(key):
        counter.incr()
        time.sleep(seconds)
        return f"value:{key}"

    fetch.__qualname__ = "fetch"
    return fetch


def cache_aside(key: str, fetch) -> str:
    """The unprotected path: a miss calls the upstream, whoever else is filling the key."""
    cache = caches["default"]
    value = cache.get(f"bench-cache:aside:{key}")
    if value is None:
        value = fetch(key)
        cache.set(f"bench-cache:aside:{key}", value, 600)
    return value


def callers(threads: int, barrier, call) -> list:
    results = [None] * threads

    def run(index):
        barrier.wait()
        results[index] = call()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def _stampede_process(threads, barrier, counter, key, protected, seconds, results):
    own = engine()  # a process of its own: its own engine, L1 and connections
    fetch = upstream(counter, seconds)
    if protected:
        values = callers(threads, barrier, lambda: own.execute(NAME, fetch, key, cache_key=key).value)
    else:
        values = callers(threads, barrier, lambda: cache_aside(key, fetch))
    results.put(values)


def stampede(count: int, processes: int, protected: bool, seconds: float) -> int:
    """Upstream calls made by ``count`` callers missing one cold key at once."""
    key = f"cold-{count}-{processes}-{protected}-{time.time_ns()}"
    counter = Counter(key)
    counter.start()
    if processes == 1:
        barrier = threading.Barrier(count)
        own = engine()
        fetch = upstream(counter, seconds)
        call = ((lambda: own.execute(NAME, fetch, key, cache_key=key).value) if protected
                else (lambda: cache_aside(key, fetch)))
        values = callers(count, barrier, call)
    else:
        barrier, results = FORK.Barrier(count), FORK.Queue()
        per_process = [count // processes + (i < count % processes) for i in range(processes)]
        children = [FORK.Process(target=_stampede_process,
                                 args=(n, barrier, counter, key, protected, seconds, results)) for n in per_process]
        for child in children:
            child.start()
        values = [value for _ in children for value in results.get(timeout=120)]
        for child in children:
            child.join(60)
        if any(child.exitcode != 0 for child in children):
            raise RuntimeError(f"a stampede process failed: {[child.exitcode for child in children]}")
    if values != [f"value:{key}"] * count:
        raise RuntimeError(f"wrong values in the stampede of {count}: {sorted(set(map(str, values)))[:3]}")
    return counter.read()


def _serve_until_cleared(trials, ready, go, results):
    own = engine()
    for trial in range(trials):
        key = f"inv-{trial}"

        def read():
            return own.execute(NAME, lambda: "new", cache_key=key).value

        while read() != "old":  # the parent's entry, now in this process's L1
            time.sleep(0.001)
        ready.wait()
        go.wait()
        while read() == "old":
            pass
        results.put(time.time())


def invalidation(processes: int, trials: int) -> list[float]:
    """Seconds from each clear until each process stops serving the cleared entry (wall clock)."""
    global NAME
    base, NAME = NAME, f"{NAME}-{time.time_ns()}"  # keys no earlier run wrote; the children fork with it
    try:
        parent = engine()
        for trial in range(trials):
            parent.execute(NAME, lambda: "old", cache_key=f"inv-{trial}")
        ready, go, results = FORK.Barrier(processes + 1), FORK.Barrier(processes + 1), FORK.Queue()
        children = [FORK.Process(target=_serve_until_cleared, args=(trials, ready, go, results))
                    for _ in range(processes)]
        for child in children:
            child.start()
        delays = []
        for trial in range(trials):
            ready.wait(60)  # every process serves the key from its L1
            go.wait(60)
            cleared_at = time.time()
            parent.cache.clear(NAME, key=f"inv-{trial}", policy=parent.registry.get(NAME))
            delays += [results.get(timeout=60) - cleared_at for _ in children]
        for child in children:
            child.join(60)
        if any(child.exitcode != 0 for child in children):
            raise RuntimeError(f"an invalidation process failed: {[child.exitcode for child in children]}")
        return delays
    finally:
        NAME = base


def hit_cost(local_entries: int, calls: int) -> float:
    own = engine(local_entries)
    key = f"hit-{local_entries}-{time.time_ns()}"

    def fetch(key):
        return "v" * 200

    fetch.__qualname__ = "fetch"
    own.execute(NAME, fetch, key, cache_key=key)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            own.execute(NAME, fetch, key, cache_key=key)
        best = min(best, time.perf_counter() - started)
    if own.execute(NAME, fetch, key, cache_key=key).source != "cache":
        raise RuntimeError("the hit benchmark did not hit the cache")
    return best / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--upstream-ms", type=float, default=50.0)
    parser.add_argument("--hits", type=int, default=20_000)
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    options = parser.parse_args()
    if options.processes < 1 or options.trials < 1 or options.hits < 1 or options.upstream_ms < 0:
        parser.error("--processes, --trials and --hits must be at least 1, --upstream-ms not negative")
    redis = on_redis()
    print(f"cache: {settings.CACHES['default']['BACKEND']}"
          + ("" if redis else " (no REDIS_URL: processes share nothing; only the in-process rows mean much)"))
    seconds = options.upstream_ms / 1000

    stampedes = []
    for count in CALLERS:
        for processes in (1, options.processes):
            row = {"callers": count, "processes": processes,
                   "protected": stampede(count, processes, True, seconds),
                   "unprotected": stampede(count, processes, False, seconds)}
            row["saved"] = row["unprotected"] - row["protected"]
            stampedes.append(row)
            print(f"stampede: {count} callers in {processes} process(es): {row['protected']} upstream call(s) "
                  f"with protection, {row['unprotected']} without")

    delays = invalidation(options.processes, options.trials) if redis else []
    if delays:
        print(f"invalidation: {len(delays)} observations ({options.processes} processes x {options.trials} "
              f"clears): median {statistics.median(delays) * 1000:.0f} ms, worst {max(delays) * 1000:.0f} ms")

    l1 = hit_cost(1024, options.hits)
    shared = hit_cost(0, max(options.hits // 10, 1))
    print(f"hit: L1 {l1:.1f} us per call, shared cache {shared:.1f} us per call ({shared / l1:.1f}x)")

    if options.json:
        Path(options.json).write_text(json.dumps({
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpu_count": os.cpu_count()},
            "cache": settings.CACHES["default"]["BACKEND"],
            "upstream_ms": options.upstream_ms,
            "stampede": stampedes,
            "invalidation": ({"processes": options.processes, "trials": options.trials,
                              "median_ms": statistics.median(delays) * 1000, "worst_ms": max(delays) * 1000,
                              "delays_ms": sorted(round(d * 1000, 1) for d in delays)} if delays else None),
            "hit_us_per_call": {"l1": l1, "shared": shared},
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
