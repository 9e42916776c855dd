"""What RateLimitMiddleware costs per request, in process, with Redis and without.

    .venv/bin/python benchmarks/bench_rate_limit.py [--redis-url URL] [--requests N] [--json FILE]

The middleware wraps a view that returns an empty response; each row is N requests
(best of 5 interleaved repeats), CPU time of this process per request:

    no limit             the request matches no group: a few prefix comparisons
    per process          LocalStore (no Redis): a lock and a deque
    Redis, busy client   one client sending request after request: leases, few round trips
    Redis, new clients   every request from another address: one round trip each
    raw EVALSHA          one EVALSHA of a trivial script, for scale: one round trip

"round trips" counts the requests written to Redis per request (a pipeline is one).
The site-level figure (throughput with the middleware on and off under wrk) is in
benchmarks/load/run.py.
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

import redis  # noqa: E402
from django.contrib.auth.models import AnonymousUser  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.test import RequestFactory, override_settings  # noqa: E402

from integrations.resilience import Engine, use_engine  # noqa: E402
from integrations.resilience.events import EventBus  # noqa: E402
from integrations.resilience.redis_store import RedisStore  # noqa: E402
from integrations.resilience.state import LocalStore  # noqa: E402
from integrations.inbound import RateLimitMiddleware  # noqa: E402

REPEATS = 5
LIMITS = {"bench": {"paths": ["/bench/"], "limit": 10**9, "window_s": 60}}


def ok(request):
    return HttpResponse()


def requests(n: int, path: str, *, new_clients: bool):
    factory = RequestFactory()
    built = []
    for i in range(n):
        address = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" if new_clients else "10.0.0.1"
        request = factory.get(path, REMOTE_ADDR=address)
        request.user = AnonymousUser()
        built.append(request)
    return built


def run(middleware, batch) -> tuple[float, float]:
    gc.collect()
    counter.writes = 0
    started = time.process_time()
    for request in batch:
        middleware(request)
    elapsed = time.process_time() - started
    return elapsed / len(batch) * 1e6, counter.writes / len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    n = args.requests
    prefix = f"bench-rl-{uuid.uuid4().hex[:8]}"
    redis_store = RedisStore(args.redis_url, prefix=prefix, bus=EventBus())
    local_store = LocalStore()
    raw = redis.Redis.from_url(args.redis_url)
    sha = raw.script_load("return 1")

    with override_settings(RESILIENCE_RATE_LIMITS=LIMITS, RESILIENCE_TRUSTED_PROXIES=[],
                           RESILIENCE_RATE_LIMIT_EXEMPT_PATHS=["/metrics"]):
        middleware = RateLimitMiddleware(ok)
    redis_engine, local_engine = Engine(store=redis_store), Engine(store=local_store)
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in (
        "no limit", "per process", "Redis, busy client", "Redis, new clients", "raw EVALSHA")}
    for repeat in range(REPEATS):
        with use_engine(local_engine):
            rows["no limit"].append(run(middleware, requests(n, "/other/", new_clients=False)))
            rows["per process"].append(run(middleware, requests(n, "/bench/", new_clients=False)))
        with use_engine(redis_engine):
            rows["Redis, busy client"].append(run(middleware, requests(n, "/bench/", new_clients=False)))
            batch = requests(n // 4, f"/bench/{repeat}/", new_clients=True)
            rows["Redis, new clients"].append(run(middleware, batch))
            counter.writes = 0
        started = time.process_time()
        for _ in range(n // 4):
            raw.evalsha(sha, 0)
        rows["raw EVALSHA"].append(((time.process_time() - started) / (n // 4) * 1e6, counter.writes / (n // 4)))
        redis_store.rate_limiter.flush()
        keys = list(raw.scan_iter(f"{prefix}:*"))
        if keys:
            raw.delete(*keys)

    summary = {name: {"us_per_request": round(min(r[0] for r in results), 2),
                      "round_trips_per_request": round(min(r[1] for r in results), 4)}
               for name, results in rows.items()}
    base = summary["no limit"]["us_per_request"]
    print(f"{'row':<22} {'us/request':>11} {'round trips':>12}  (CPU of this process, best of {REPEATS}, N={n})")
    for name, row in summary.items():
        print(f"{name:<22} {row['us_per_request']:>11.2f} {row['round_trips_per_request']:>12.4f}")
    print(f"busy client over no limit: +{summary['Redis, busy client']['us_per_request'] - base:.2f} us; "
          f"new clients: +{summary['Redis, new clients']['us_per_request'] - base:.2f} us")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
