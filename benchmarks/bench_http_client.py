"""The http Client's cost per request and how far past its deadline a stalled request keeps the caller.

    .venv/bin/python benchmarks/bench_http_client.py [--requests N] [--json FILE] [--instructions]

The upstream is benchmarks/load/upstream.py in a process of its own (asyncio,
keep-alive, a small JSON), so the CPU figures are this process's: the client's.

Per request (GET /item): N requests per row, run in rounds: each round runs a
chunk of 20 requests of every row in turn (the order rotated round by round), so
a row's overhead is measured against bare httpx's chunk of the same round, a few
ms apart; what the machine does meanwhile falls on both. Every row is built 5
times over (its own client, connection and breaker each), and round r runs
instance r mod 5 of every row: two instances of one and the same row differ by
up to 5 µs a request (which connection, where its objects lie in memory), as
much as the rows differ, so one instance per row cannot tell them apart. A
row's overhead is the mean over its instances of the median difference to bare
httpx of the rounds that ran it, shown with its standard error (over the
instances) and the lowest and highest instance; wall and CPU time per request
are medians over all rounds, and "rounds <= stacked" says in how many rounds a
row's overhead was at most the stacked pair's of the same round:

    bare httpx          httpx.Client(timeout=5).get(): no resilience at all
    tenacity+pybreaker  the same get() inside pybreaker's CircuitBreaker.call, in
                        a function decorated with tenacity's @retry (3 retries):
                        what a user stacks today (no timeout beyond httpx's)
    ours, Client        integrations.http.Client.get() on an integration with
                        the default timeout_enforcement="thread", 3 retries,
                        breaker, bulkhead and quota on: its DeadlineTransport
                        ends every socket operation by the attempt's deadline,
                        so attempts run in the caller's thread
    ours, thread        the same Client given a plain httpx.HTTPTransport: the
                        attempt is handed to a worker thread (what
                        timeout_enforcement="thread" costs any other operation)

Overrun (attempt timeout 200 ms, no retry; 10 requests per row): how long after
its deadline the caller got its TIMEOUT, for an upstream that never answers
(/__hang) and one that trickles a byte every 50 ms and never finishes
(/__trickle: every read gets data, so per-read timeouts never fire; bare httpx
with timeout=0.2 would wait forever and has no row). Median and worst, ms.

--instructions adds counts that machine noise cannot move: each row's client
process run under valgrind's callgrind twice, with 0 and with 1,000 requests
after the same 50 warm-up requests (PYTHONHASHSEED=0), the difference / 1,000 =
per request: instructions, and from callgrind's cache and branch simulation
(this machine's L1 caches and L2, read from /sys) L1 and L2 misses and branch
mispredictions, which cost cycles that instructions do not show (the
upstream's are not counted: its own process). Every run also counts the Python
bytecodes one request runs outside httpx and the standard library: the
resilience layer's own (sys.settrace).
A wall-time difference of a few µs over a 400 µs request is within the noise
of two processes sharing two cores (the standard error says how much); the
instruction count is not.

Targets (issue 14): the default path costs <= the stacked pair; the caller is
never kept past its deadline (overrun bounded: a few ms).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# bench_overhead sets up Django and holds the peers' configuration (the same stacked pair).
from bench_overhead import build_engine, machine, tenacity_retry  # noqa: E402

import pybreaker  # noqa: E402

from integrations.errors import ErrorCategory, ResilienceError  # noqa: E402
from integrations.http import Client  # noqa: E402
from integrations.resilience import Policy, use_engine  # noqa: E402

CHUNK = 20  # requests a row runs before the next row takes its turn
INSTANCES = 5  # copies of every row, each with its own client and connection, taken in turn round by round
POLICY = Policy(name="bench_http", max_retries=3, hourly_limit=10**9, daily_limit=10**9, max_concurrent=100,
                attempt_timeout_ms=5000, timeout_ms=20000, cache_ttl_s=0)
STALL_POLICY = Policy(name="bench_stall", max_retries=0, attempt_timeout_ms=200, timeout_ms=200,
                      max_concurrent=100, failure_threshold=10**6, failure_rate_threshold=0,
                      slow_call_rate_threshold=0, cache_ttl_s=0)
DEADLINE_S = 0.2


def start_upstream() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(HERE / "load" / "upstream.py"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "PORT":
        proc.kill()
        raise SystemExit(f"the upstream did not start: {line!r}")
    return proc, f"http://127.0.0.1:{line[1]}"


def build_rows(url: str):
    bare = httpx.Client(base_url=url, timeout=5.0)
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)

    @tenacity_retry()
    def stacked():
        return breaker.call(bare.get, "/item")

    ours = Client(POLICY.name, base_url=url)
    ours_thread = Client(POLICY.name, base_url=url, transport=httpx.HTTPTransport())
    return {
        "bare httpx": lambda: bare.get("/item"),
        "tenacity+pybreaker": stacked,
        "ours, Client": lambda: ours.get("/item"),
        "ours, thread": lambda: ours_thread.get("/item"),
    }


CALLGRIND_REQUESTS = 1000


def child(row: str, requests: int, url: str) -> None:
    """--child: 50 warm-up requests of one row, then ``requests`` more (what callgrind counts)."""
    with use_engine(build_engine(POLICY)):
        fn = build_rows(url)[row]
        for _ in range(50):
            fn().raise_for_status()
        for _ in range(requests):
            fn()


def cache_geometry() -> list[str]:
    """valgrind's --I1/--D1/--LL for this machine's first core (its L1 caches and, as the last level,
    its own L2: the L3 is shared and far larger), from /sys; none where /sys does not say."""
    found = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size, ways, line = ((index / name).read_text().strip() for name in
                                             ("level", "type", "size", "ways_of_associativity", "coherency_line_size"))
        except OSError:
            continue  # an index without the geometry: valgrind's defaults stand for it
        option = {("1", "Instruction"): "--I1", ("1", "Data"): "--D1", ("2", "Unified"): "--LL"}.get((level, kind))
        if option and size.endswith("K"):
            found[option] = f"{option}={int(size[:-1]) * 1024},{ways},{line}"
    return list(found.values())


# callgrind's events, summed into what a request costs the CPU besides its instructions
EVENT_GROUPS = {"instructions": ("Ir",), "l1_misses": ("I1mr", "D1mr", "D1mw"),
                "l2_misses": ("ILmr", "DLmr", "DLmw"), "branch_mispredicts": ("Bcm", "Bim")}


def instructions(row: str, url: str, requests: int = CALLGRIND_REQUESTS) -> dict[str, int]:
    """Per request of ``row``'s client process, counted by callgrind with its cache and branch
    simulation: instructions, L1 and L2 misses (this machine's geometry), branch mispredictions."""
    def collected(count: int) -> dict[str, int]:
        run = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", "--cache-sim=yes",
                              "--branch-sim=yes", *cache_geometry(), sys.executable,
                              __file__, "--child", row, "--requests", str(count), "--url", url],
                             capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, timeout=3600)
        events = [line.split(":", 1)[1].split() for line in run.stderr.splitlines() if "Events    :" in line]
        found = [line.split(":", 1)[1].split() for line in run.stderr.splitlines() if "Collected :" in line]
        if run.returncode != 0 or not found or not events:
            raise SystemExit(f"callgrind run of {row!r} failed (exit {run.returncode}): {run.stderr[-2000:]}")
        counts = dict(zip(events[-1], map(int, found[-1])))
        return {group: sum(counts.get(event, 0) for event in names) for group, names in EVENT_GROUPS.items()}
    before, after = collected(0), collected(requests)
    return {group: (after[group] - before[group]) // requests for group in EVENT_GROUPS}


# the code that does the HTTP itself: every row runs it alike, so it is not the resilience layer's
HTTP_CODE = ("httpx", "httpcore", "h11")


def layer_bytecodes(fn) -> int:
    """Python bytecodes one request runs outside httpx and the standard library (the resilience
    layer's own: ours, or tenacity's and pybreaker's), counted with sys.settrace after a warm-up."""
    for _ in range(20):
        fn()
    stdlib = os.path.dirname(os.__file__)

    def layer(path: str) -> bool:
        if "site-packages/" in path:
            return path.split("site-packages/")[1].split("/")[0] not in HTTP_CODE
        return not path.startswith((stdlib, "<"))  # the standard library, frozen modules

    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode" and layer(frame.f_code.co_filename):
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def warm_up(fn) -> None:
    for _ in range(50):
        fn().raise_for_status()


def time_row(fn, requests: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per request."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(requests):
        fn()
    return ((time.perf_counter() - wall0) / requests * 1e6, (time.process_time() - cpu0) / requests * 1e6)


def overrun(client: Client, path: str, calls: int = 10) -> dict:
    late = []
    for _ in range(calls):
        started = time.perf_counter()
        try:
            client.get(path)
        except ResilienceError as error:
            if error.category is not ErrorCategory.TIMEOUT:
                raise SystemExit(f"{path}: expected a TIMEOUT, got {error.category.value}: {error}") from error
        else:
            raise SystemExit(f"{path}: answered, but it never should")
        late.append((time.perf_counter() - started - DEADLINE_S) * 1000)
    return {"median_ms": round(statistics.median(late), 2), "worst_ms": round(max(late), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--instructions", action="store_true", help="also count instructions, cache misses "
                        "and branch mispredictions per request under valgrind's callgrind (about 10 minutes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.requests, args.url)
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions: valgrind is not installed (Debian: apt-get install valgrind)")
    upstream, url = start_upstream()
    try:
        with use_engine(build_engine(POLICY)) as engine:
            engine.registry.put(STALL_POLICY)
            instances = [build_rows(url) for _ in range(INSTANCES)]
            rows = instances[0]
            bytecodes = {name: layer_bytecodes(fn) for name, fn in rows.items()}
            for built in instances:
                for fn in built.values():
                    warm_up(fn)
            names = list(rows)
            rounds: list[dict[str, tuple[float, float]]] = []
            for number in range(max(args.requests // CHUNK, INSTANCES)):
                shift, built = number % len(names), instances[number % INSTANCES]
                rounds.append({name: time_row(built[name], min(CHUNK, args.requests))
                               for name in names[shift:] + names[:shift]})
            stall = {"ours, Client": Client(STALL_POLICY.name, base_url=url),
                     "ours, thread": Client(STALL_POLICY.name, base_url=url, transport=httpx.HTTPTransport())}
            overruns = {f"{name}, {path}": overrun(client, path)
                        for path in ("/__hang", "/__trickle") for name, client in stall.items()}
        counted = {}
        if args.instructions:
            with ThreadPoolExecutor(2) as pool:  # callgrind's count does not depend on what else runs
                counted = dict(zip(rows, pool.map(lambda name: instructions(name, url), rows)))
    finally:
        upstream.terminate()
        upstream.wait(10)
    median = statistics.median
    per_row = {name: (median(r[name][0] for r in rounds), median(r[name][1] for r in rounds)) for name in rows}
    # per instance: the median difference to bare httpx over the rounds that ran it (wall, CPU)
    by_instance = {name: [(median(r[name][0] - r["bare httpx"][0] for r in rounds[k::INSTANCES]),
                           median(r[name][1] - r["bare httpx"][1] for r in rounds[k::INSTANCES]))
                          for k in range(INSTANCES)] for name in rows}
    over = {name: (statistics.fmean(w for w, _ in found), statistics.fmean(c for _, c in found))
            for name, found in by_instance.items()}
    stacked_over = over["tenacity+pybreaker"]
    print(f"{len(rounds) * CHUNK} requests per row in {len(rounds)} rounds of {CHUNK}, {INSTANCES} instances of "
          f"every row, upstream {url}\n")
    print(f"{'row':20} {'µs/req':>8} {'CPU µs/req':>11} {'over bare':>10} {'SE':>5} {'instances':>13} "
          f"{'CPU over bare':>14} {'x stacked':>10} {'rounds <= stacked':>18}")
    table = {}
    for name, (wall, cpu) in per_row.items():
        extra, cpu_extra = over[name]
        walls = [w for w, _ in by_instance[name]]
        error = statistics.stdev(walls) / INSTANCES ** 0.5
        spread = f"{min(walls):+.1f}..{max(walls):+.1f}"
        ratio = extra / stacked_over[0] if name != "bare httpx" else None
        beaten = sum((r[name][0] - r["bare httpx"][0]) <= (r["tenacity+pybreaker"][0] - r["bare httpx"][0])
                     for r in rounds)
        table[name] = {"us_per_request": round(wall, 1), "cpu_us_per_request": round(cpu, 1),
                       "overhead_us": round(extra, 1), "overhead_standard_error_us": round(error, 2),
                       "overhead_by_instance_us": [round(w, 1) for w in walls], "cpu_overhead_us": round(cpu_extra, 1),
                       "overhead_x_stacked": None if ratio is None else round(ratio, 2),
                       "rounds_at_most_stacked": None if ratio is None else f"{beaten}/{len(rounds)}"}
        print(f"{name:20} {wall:8.1f} {cpu:11.1f} {extra:+10.1f} {error:5.1f} {spread:>13} {cpu_extra:+14.1f} "
              f"{'' if ratio is None else f'{ratio:.2f}x':>10} {'' if ratio is None else f'{beaten}/{len(rounds)}':>18}")
    print(f"\noverrun past a {DEADLINE_S * 1000:.0f} ms attempt deadline (10 requests each):")
    for name, figures in overruns.items():
        print(f"  {name:28} median {figures['median_ms']:6.2f} ms, worst {figures['worst_ms']:6.2f} ms")
    print("\nPython bytecodes a request runs outside httpx and the standard library (the layer's own):")
    for name, count in bytecodes.items():
        table[name]["layer_bytecodes_per_request"] = count
        print(f"  {name:20} {count:>6,}")
    if counted:
        bare_count, stacked_count = counted["bare httpx"], counted["tenacity+pybreaker"]
        print(f"\nper request over bare httpx (callgrind, {CALLGRIND_REQUESTS} requests after 50 warm-up; "
              f"{' '.join(cache_geometry()) or 'valgrind default caches'}):")
        print(f"  {'row':20} " + " ".join(f"{group:>20}" for group in EVENT_GROUPS))
        for name, counts in counted.items():
            table[name]["callgrind_per_request"] = counts
            if name == "bare httpx":
                print(f"  {name:20} " + " ".join(f"{counts[group]:>20,}" for group in EVENT_GROUPS))
                continue
            cells = []
            for group in EVENT_GROUPS:
                extra, stacked_extra = counts[group] - bare_count[group], stacked_count[group] - bare_count[group]
                cells.append(f"{extra:+,}" + (f" ({extra / stacked_extra:.2f}x)" if stacked_extra > 0 else ""))
            print(f"  {name:20} " + " ".join(f"{cell:>20}" for cell in cells))
    ours = over["ours, Client"][0]
    print(f"\nours, Client: {ours:+.1f} µs over bare httpx (mean of its instances' medians), against {stacked_over[0]:+.1f} µs for "
          f"the stacked pair (target <= 1x: {'PASS' if ours <= stacked_over[0] else 'FAIL'})")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "http client", "requests": len(rounds) * CHUNK,
                                         "rounds": len(rounds), "chunk": CHUNK, "instances": INSTANCES, "rows": table,
                                         "overrun": overruns, "machine": machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
