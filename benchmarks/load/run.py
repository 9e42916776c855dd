"""The load benchmark, in one command: the real site under gunicorn, PostgreSQL and Redis, driven by wrk.

    .venv/bin/python benchmarks/load/run.py [--quick] [--repeat N] [--workers 4] [--profile]
    .venv/bin/python benchmarks/load/run.py --scenario soak [--soak-minutes 10] [--sample-s 15]
    .venv/bin/python benchmarks/load/run.py --scenario stress [--fail-rate 0.6] [--stress-connections ...]

Steps, in order:

1. Checks the tools (wrk, PostgreSQL at 127.0.0.1:5432, Redis at 127.0.0.1:6379)
   and creates the database ``load`` if it is missing.
2. Starts the local upstream (upstream.py) on a free port of 127.0.0.1.
3. Migrates the database and runs prepare.py (the integration ``load_upstream``,
   a staff user and its API token).
4. Starts two gunicorn masters with deploy/gunicorn.conf.py, serving the real
   site plus /load/guarded/ (settings.py, urls.py), each with --workers:
   "limits on" (RESILIENCE_RATE_LIMITS: the default groups plus one for
   /load/, every limit 10^9 so nothing is refused but every request is counted
   in Redis) and "limits off" (RESILIENCE_RATE_LIMITS={}). Only one is driven at
   a time; the other idles.
5. For each repeat: a warm-up, then the scenarios against "limits on"
   (ramp, steady, API steady, spike), then the rate-limit cost (the same
   steady load on "on" and "off", interleaved on, off, off, on...), then the pipeline's
   cost: the guarded view and the same upstream call with bare httpx, interleaved on "on".
   With --profile, then py-spy on the workers under the steady load.
6. Writes results.json and RESULTS.md beside this file (each row with the wrk
   command that produced it).
7. Tears down: both gunicorn masters, the upstream, this run's Redis keys
   (prefix ``load`` in db 1). The PostgreSQL database ``load`` is kept, with its
   tables (the next run migrates it and resets its rows).

Opt-in scenarios, each alone on one gunicorn master, into files of their own
(soak.json and SOAK.md, stress.json and STRESS.md; results.json is left as it is):

- ``--scenario soak``: steady load on /load/guarded/ (rate limits counted) for
  --soak-minutes, as back-to-back wrk segments of --sample-s; after each, the
  workers' RSS and open descriptors, Redis db 1's keys and the server's memory,
  and the product tables' sizes and rows. Drift: the least-squares slope per
  minute from the first minute on; the error rate; p95 segment by segment.
- ``--scenario stress``: a baseline under the rate limit, then connections
  stepped far past saturation (--stress-connections) twice, the upstream
  degraded (upstream.py's /__fault: --degraded-fail-rate of 503s, --spike-rate
  of --spike-ms latency spikes), then failing (--fail-rate of 503s), with a
  real limit on /load/guarded/
  (--stress-rate-limit per 10 s); then the faults removed and the baseline again
  until two segments in a row are clean. wrk counts the statuses (statuses.lua).
  It exits 1 unless only 200, 429 and the guarded view's 503 (naming a
  category) were answered, no worker died or was replaced, and the site recovered.

wrk is closed-loop: each connection sends its next request when the previous
answer arrives, so "steady" is a fixed number of connections, and the rate is
what the site achieves at that concurrency. wrk runs on the same two cores as
the site; its CPU share is reported with every row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
GUNICORN = ROOT / ".venv" / "bin" / "gunicorn"
REPORT_LUA = HERE / "report.lua"
STATUSES_LUA = HERE / "statuses.lua"
RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"
# The opt-in scenarios write files of their own, so they never replace the default run's figures.
SCENARIO_FILES = {"soak": (HERE / "soak.json", HERE / "SOAK.md"), "stress": (HERE / "stress.json", HERE / "STRESS.md")}

HOST = "127.0.0.1"
PG_DATABASE = "load"
PG_URL = f"postgres://postgres@{HOST}:5432/{PG_DATABASE}"
REDIS_URL = f"redis://{HOST}:6379/1"
KEY_PREFIX = "load"

GUARDED_PATH = "/load/guarded/"
API_PATH = "/api/dlq/stats/"
# The same views where no group of RATE_LIMITS_ON matches (urls.py): the "limits off" side of the cost.
UNCOUNTED = {GUARDED_PATH: "/load/uncounted/guarded/", API_PATH: "/load/uncounted/api/dlq/stats/"}
# The same upstream call with bare httpx, not counted either: guarded / bare is the pipeline's cost (issue 14).
BARE_PATH = "/load/uncounted/bare/"
BARE_RATIO_TARGET = 0.9

# Targets of issue 7.
P95_TARGET_MS = 200.0
ERROR_RATE_TARGET = 0.001
RATE_TARGET = 1000.0
MIDDLEWARE_COST_TARGET = 0.10

# High enough that nothing is refused, so every request is counted and none is turned away.
UNREFUSED_LIMIT = 1_000_000_000
RATE_LIMITS_ON = {
    "api_read": {"paths": ["/api/"], "methods": ["GET", "HEAD", "OPTIONS"], "limit": UNREFUSED_LIMIT, "window_s": 60},
    "api_write": {"paths": ["/api/"], "methods": ["POST", "PUT", "PATCH", "DELETE"], "limit": UNREFUSED_LIMIT,
                  "window_s": 60},
    "admin_login": {"paths": ["/admin/login/"], "methods": ["POST"], "limit": UNREFUSED_LIMIT, "window_s": 60},
    "load": {"paths": ["/load/guarded/"], "limit": UNREFUSED_LIMIT, "window_s": 60},
}
RATE_LIMITS_OFF: dict = {}

RAMP_CONNECTIONS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
QUICK_RAMP_CONNECTIONS = (1, 4, 16, 64)


@dataclass(frozen=True)
class Durations:
    warmup_s: int
    ramp_step_s: int
    steady_s: int
    api_s: int
    cost_segment_s: int
    cost_pairs: int
    spike_phase_s: int
    ramp: tuple[int, ...]


FULL = Durations(warmup_s=5, ramp_step_s=10, steady_s=30, api_s=20, cost_segment_s=5, cost_pairs=6,
                 spike_phase_s=10, ramp=RAMP_CONNECTIONS)
QUICK = Durations(warmup_s=2, ramp_step_s=3, steady_s=5, api_s=3, cost_segment_s=3, cost_pairs=1,
                  spike_phase_s=3, ramp=QUICK_RAMP_CONNECTIONS)


def log(message: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- CPU accounting from /proc: who used the two cores during a scenario ---------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of one process and its reaped children, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is the state (field 3): utime is field 14, stime 15, cutime 16, cstime 17
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def tree_cpu_s(pid: int) -> float:
    return _proc_cpu_s(pid) + sum(tree_cpu_s(child) for child in _children(pid))


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def service_cpu_s() -> dict[str, dict[int, float]]:
    """CPU seconds so far of the shared services this benchmark uses, per pid: the Redis server on 6379
    (other engineers' runs use it too) and the PostgreSQL backends connected to the database ``load``."""
    found: dict[str, dict[int, float]] = {"redis": {}, "postgres": {}}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        cmdline = _cmdline(entry.name)
        if cmdline.startswith("redis-server") and f"{HOST}:6379" in cmdline:
            found["redis"][int(entry.name)] = _proc_cpu_s(int(entry.name))
        elif cmdline.startswith("postgres:") and f" {PG_DATABASE} " in cmdline:
            found["postgres"][int(entry.name)] = _proc_cpu_s(int(entry.name))
    return found


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (every core), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


# -- the processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, name: str, timeout_s: float = 20) -> None:
    """SIGTERM (gunicorn stops its workers gracefully), then SIGKILL to the process group it leads."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) did not stop in {timeout_s:g} s; killing its process group")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@dataclass
class Site:
    """One gunicorn master serving the load settings."""

    label: str
    rate_limits: dict
    port: int
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    command: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


class Stack:
    """The upstream and the gunicorn masters; ``close()`` stops every process it started."""

    def __init__(self, args, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.upstream: subprocess.Popen | None = None
        self.upstream_port = 0
        self.sites: dict[str, Site] = {}
        self.token = ""

    def env(self, **extra) -> dict:
        env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(
            DJANGO_SETTINGS_MODULE="benchmarks.load.settings",
            DATABASE_URL=PG_URL,
            REDIS_URL=REDIS_URL,
            RESILIENCE_KEY_PREFIX=KEY_PREFIX,
            # Production mode: DEBUG on would keep every query in memory and change the figures.
            DEBUG="0",
            SECRET_KEY="load-benchmark-only-not-a-secret-0123456789abcdefghijklmnopqrstuvwxyz",
            SECURE_SSL_REDIRECT="false",
            ALLOWED_HOSTS=f"{HOST},localhost",
            LOG_LEVEL="WARNING",
            LOAD_UPSTREAM_URL=f"http://{HOST}:{self.upstream_port}",
            PYTHONPATH=str(ROOT),
        )
        env.update(extra)
        return env

    def start_upstream(self) -> None:
        command = [str(PYTHON), str(HERE / "upstream.py"), "--latency-ms", str(self.args.upstream_latency_ms)]
        self.upstream = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.upstream.stdout.readline()
        match = re.match(r"PORT (\d+)", line)
        if not match:
            raise RuntimeError(f"the upstream did not start: {line!r}")
        self.upstream_port = int(match.group(1))
        log(f"upstream on {HOST}:{self.upstream_port} (latency {self.args.upstream_latency_ms:g} ms)")

    def prepare_database(self) -> None:
        env = self.env()
        subprocess.run([str(PYTHON), "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
        out = subprocess.run([str(PYTHON), str(HERE / "prepare.py")], cwd=ROOT, env=env, check=True,
                             capture_output=True, text=True).stdout
        self.token = json.loads(out.strip().splitlines()[-1])["token"]
        log("database migrated; integration load_upstream and the API token ready")

    def start_site(self, label: str, rate_limits: dict) -> Site:
        site = Site(label, rate_limits, free_port())
        site.log_path = self.workdir / f"gunicorn-{label}.log"
        site.command = [str(GUNICORN), "-c", "deploy/gunicorn.conf.py", "--workers", str(self.args.workers),
                        "--worker-class", self.args.worker_class, "--threads", str(self.args.threads),
                        "--bind", f"{HOST}:{site.port}", "--backlog", "2048"]
        env = self.env(RESILIENCE_RATE_LIMITS=json.dumps(rate_limits))
        with open(site.log_path, "w") as log_file:
            site.proc = subprocess.Popen(site.command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.sites[label] = site
        self.wait_ready(site)
        log(f"gunicorn '{label}' on {site.url}: {self.args.workers} {self.args.worker_class} workers"
            + (f" x {self.args.threads} threads" if self.args.worker_class == "gthread" else ""))
        return site

    def wait_ready(self, site: Site, timeout_s: float = 60) -> None:
        """Every endpoint driven answers 200 (and the guarded call succeeded) before any load starts."""
        deadline = time.monotonic() + timeout_s
        while True:
            if site.proc.poll() is not None:
                raise RuntimeError(f"gunicorn '{site.label}' exited: {site.log_path.read_text()[-3000:]}")
            try:
                guarded = self.get(site, GUARDED_PATH)
                api = self.get(site, API_PATH, token=True)
                if not guarded.get("ok"):
                    raise RuntimeError(f"the guarded call failed: {guarded}")
                if not isinstance(api, dict):
                    raise RuntimeError(f"unexpected API answer: {api}")
                return
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn '{site.label}' not ready after {timeout_s:g} s: {exc}") from exc
                time.sleep(0.5)

    def get(self, site: Site, path: str, token: bool = False) -> dict:
        request = urllib.request.Request(site.url + path)
        if token:
            request.add_header("Authorization", f"Token {self.token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"{path} answered {response.status}")
            return json.loads(response.read())

    def upstream_cpu_s(self) -> float:
        return _proc_cpu_s(self.upstream.pid) if self.upstream else 0.0

    def close(self) -> None:
        for site in self.sites.values():
            if site.proc is not None:
                stop_process(site.proc, f"gunicorn '{site.label}'")
        if self.upstream is not None:
            stop_process(self.upstream, "upstream")
        clear_redis_keys()


def clear_redis_keys() -> int:
    """This benchmark's shared-state keys (the rate-limit logs above all: up to a minute of requests)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    deleted = 0
    with contextlib.suppress(redis.exceptions.RedisError):
        for key in client.scan_iter(match=f"{KEY_PREFIX}:*", count=1000):
            deleted += client.delete(key)
    client.close()
    return deleted


# -- preflight -------------------------------------------------------------------------------------


def preflight() -> str:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install -y --no-install-recommends wrk")
    for tool in ("pg_isready", "psql", "createdb"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (PostgreSQL client tools)")
    if subprocess.run(["pg_isready", "-h", HOST, "-p", "5432"], capture_output=True).returncode != 0:
        raise SystemExit(f"PostgreSQL does not answer at {HOST}:5432")
    exists = subprocess.run(["psql", "-h", HOST, "-U", "postgres", "-tAc",
                             f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'"],
                            capture_output=True, text=True, check=True).stdout.strip()
    if exists != "1":
        subprocess.run(["createdb", "-h", HOST, "-U", "postgres", PG_DATABASE], check=True)
        log(f"created the PostgreSQL database {PG_DATABASE}")
    import redis

    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.exceptions.RedisError as exc:
        raise SystemExit(f"Redis does not answer at {REDIS_URL}: {exc}") from None
    if not PYTHON.exists() or not GUNICORN.exists():
        raise SystemExit("the project's .venv is missing: make install")
    version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return version.split(" [")[0].strip()  # "wrk debian/4.1.0-3+b2 [epoll] Copyright ..."


# -- wrk -------------------------------------------------------------------------------------------


def wrk_command(url: str, connections: int, duration_s: float, token: str | None = None,
                script: Path = REPORT_LUA) -> list[str]:
    threads = min(2, connections)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "5s",
               "-s", str(script.relative_to(ROOT))]
    if token:
        command += ["-H", f"Authorization: Token {token}"]
    return command + [url]


def shown(command: list[str]) -> str:
    """The command as printed in the results: the token replaced by a placeholder."""
    text = shlex.join(command)
    return re.sub(r"Token [0-9a-f]{40}", "Token $TOKEN", text)


@dataclass
class Running:
    command: list[str]
    proc: subprocess.Popen
    started: float


def start_wrk(command: list[str]) -> Running:
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Running(command, proc, time.monotonic())


def finish_wrk(running: Running) -> dict:
    output, _ = running.proc.communicate()
    match = re.search(r"^LOADJSON (\{.*\})$", output, re.MULTILINE)
    if running.proc.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({shown(running.command)}):\n{output}")
    raw = json.loads(match.group(1))
    counted = re.search(r"^STATUSJSON (\{.*\})$", output, re.MULTILINE)  # statuses.lua only
    duration_s = raw["duration_us"] / 1e6
    socket_errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
    errors = raw["status_errors"] + socket_errors
    attempts = raw["requests"] + raw["connect_errors"] + raw["timeouts"]
    return {
        "connections": int(re.search(r"-c(\d+)", " ".join(running.command)).group(1)),
        "duration_s": round(duration_s, 2),
        "requests": raw["requests"],
        "rps": round(raw["requests"] / duration_s, 1),
        "p50_ms": round(raw["p50_us"] / 1000, 2),
        "p95_ms": round(raw["p95_us"] / 1000, 2),
        "p99_ms": round(raw["p99_us"] / 1000, 2),
        "max_ms": round(raw["max_us"] / 1000, 2),
        "errors": errors,
        "error_rate": round(errors / attempts, 6) if attempts else 0.0,
        "non_2xx": raw["status_errors"],
        "socket_errors": {"connect": raw["connect_errors"], "read": raw["read_errors"],
                          "write": raw["write_errors"], "timeout": raw["timeouts"]},
        "command": shown(running.command),
        **(json.loads(counted.group(1)) if counted else {}),
    }


class Measure:
    """CPU seconds used during a scenario by wrk, the site, the upstream and the whole machine."""

    def __init__(self, stack: Stack, site: Site) -> None:
        self.stack = stack
        self.site = site

    def __enter__(self):
        self.t0 = time.monotonic()
        self.load1 = os.getloadavg()[0]
        self.children0 = os.times().children_user + os.times().children_system
        self.server0 = tree_cpu_s(self.site.proc.pid)
        self.upstream0 = self.stack.upstream_cpu_s()
        self.machine0 = machine_busy_s()
        self.services0 = service_cpu_s()
        return self

    def __exit__(self, *exc):
        elapsed = time.monotonic() - self.t0
        children = os.times().children_user + os.times().children_system - self.children0
        server = tree_cpu_s(self.site.proc.pid) - self.server0
        self.site_cpu_s = server
        upstream = self.stack.upstream_cpu_s() - self.upstream0
        machine = machine_busy_s() - self.machine0
        services1 = service_cpu_s()
        services = {name: sum(cpu - self.services0[name].get(pid, 0.0) for pid, cpu in pids.items())
                    for name, pids in services1.items()}
        self.cpu = {
            "loadavg_1m_before": round(self.load1, 2),
            # Cores' worth (1.0 = one core busy the whole time); wrk is this script's only waited-for child.
            "wrk_cores": round(children / elapsed, 2),
            "site_cores": round(server / elapsed, 2),
            "upstream_cores": round(upstream / elapsed, 2),
            # Redis: the whole server, so other engineers' use of it is in here too.
            "redis_cores": round(services["redis"] / elapsed, 2),
            "postgres_cores": round(services["postgres"] / elapsed, 2),
            "machine_busy_cores": round(machine / elapsed, 2),
        }
        ours = sum(self.cpu[key] for key in ("wrk_cores", "site_cores", "upstream_cores", "redis_cores",
                                             "postgres_cores"))
        self.cpu["other_cores"] = round(max(0.0, self.cpu["machine_busy_cores"] - ours), 2)
        return False


def drive(stack: Stack, site: Site, path: str, connections: int, duration_s: float, token: bool = False,
          script: Path = REPORT_LUA) -> dict:
    command = wrk_command(site.url + path, connections, duration_s, stack.token if token else None, script)
    with Measure(stack, site) as measure:
        row = finish_wrk(start_wrk(command))
    row["cpu"] = measure.cpu
    # The site's CPU per request: unlike req/s, it hardly depends on how much CPU others left us.
    row["site_cpu_ms_per_request"] = round(measure.site_cpu_s * 1000 / row["requests"], 3) if row["requests"] else None
    row["endpoint"] = path
    row["site"] = site.label
    return row


def passes(row: dict) -> bool:
    return row["p95_ms"] < P95_TARGET_MS and row["error_rate"] < ERROR_RATE_TARGET


def describe(row: dict) -> str:
    return (f"{row['endpoint']} c={row['connections']}: {row['rps']:.0f} req/s, p50 {row['p50_ms']:.1f} "
            f"p95 {row['p95_ms']:.1f} p99 {row['p99_ms']:.1f} ms, errors {row['errors']} "
            f"({row['error_rate']:.3%}), site {row['site_cpu_ms_per_request']} ms CPU/req, cores: site {row['cpu']['site_cores']} wrk {row['cpu']['wrk_cores']} "
            f"redis {row['cpu']['redis_cores']} pg {row['cpu']['postgres_cores']} other {row['cpu']['other_cores']}")


# -- the scenarios ---------------------------------------------------------------------------------


def ramp(stack: Stack, site: Site, durations: Durations) -> list[dict]:
    """More connections step by step, until p95 passes the target (or errors do) or the steps run out."""
    rows = []
    for connections in durations.ramp:
        row = drive(stack, site, GUARDED_PATH, connections, durations.ramp_step_s)
        rows.append(row)
        log(f"ramp   {describe(row)}")
        if not passes(row):
            break
    return rows


def sustainable(rows: list[dict]) -> dict:
    """What the ramp says the site sustains with p95 and errors within the targets.

    "best": the passing step with the highest req/s. "saturated": the passing step with the most
    connections, i.e. the last before the ramp stopped: the site at its highest load that still
    met the targets. On a shared machine a single step can be lucky, so both are kept.
    """
    passing = [row for row in rows if passes(row)]

    def brief(row):
        return None if row is None else {"rps": row["rps"], "connections": row["connections"],
                                         "p95_ms": row["p95_ms"], "error_rate": row["error_rate"]}

    return {"best": brief(max(passing, key=lambda row: row["rps"]) if passing else None),
            "saturated": brief(max(passing, key=lambda row: row["connections"]) if passing else None)}


def spike(stack: Stack, site: Site, baseline: int, extra: int, phase_s: int) -> dict:
    """Baseline connections for three phases; during the middle one, ``extra`` more connections at once."""
    result = {}
    with Measure(stack, site) as measure:
        result["before"] = finish_wrk(start_wrk(wrk_command(site.url + GUARDED_PATH, baseline, phase_s)))
        during = start_wrk(wrk_command(site.url + GUARDED_PATH, baseline, phase_s))
        burst = start_wrk(wrk_command(site.url + GUARDED_PATH, extra, phase_s))
        result["during"] = finish_wrk(during)
        result["burst"] = finish_wrk(burst)
        result["after"] = finish_wrk(start_wrk(wrk_command(site.url + GUARDED_PATH, baseline, phase_s)))
    for phase, row in result.items():
        row["endpoint"] = GUARDED_PATH
        row["site"] = site.label
        log(f"spike  {phase:6s} {row['endpoint']} c={row['connections']}: {row['rps']:.0f} req/s, "
            f"p50 {row['p50_ms']:.1f} p95 {row['p95_ms']:.1f} p99 {row['p99_ms']:.1f} ms, errors {row['errors']}")
    # During the burst both wrk processes drive the site: its rate is their sum.
    both = result["during"]["rps"] + result["burst"]["rps"]
    return {"baseline_connections": baseline, "burst_connections": extra, "phase_s": phase_s,
            "phases": result, "during_total_rps": round(both, 1), "cpu": measure.cpu}


def rate_limit_cost(stack: Stack, path: str, connections: int, durations: Durations, token: bool) -> dict:
    """The same steady load on one site, counted (``path``) and not counted (its twin in UNCOUNTED),
    interleaved on/off/off/on...: the same workers, so only the counting differs."""
    return interleaved(stack, path, UNCOUNTED[path], connections, durations, token, "limits")


def bare_cost(stack: Stack, connections: int, durations: Durations) -> dict:
    """The guarded view ("on") and the bare httpx view ("off") making the same upstream call, neither
    counted by a rate limit, interleaved on one site: only the pipeline differs."""
    return interleaved(stack, UNCOUNTED[GUARDED_PATH], BARE_PATH, connections, durations, False, "guarded")


def interleaved(stack: Stack, on_path: str, off_path: str, connections: int, durations: Durations, token: bool,
                what: str) -> dict:
    """Steady load on ``on_path`` and ``off_path`` of the "on" site, in segments on/off/off/on...,
    and their ratios: throughput on/off and site CPU per request of each."""
    order = []
    for pair in range(durations.cost_pairs):
        order += ["on", "off"] if pair % 2 == 0 else ["off", "on"]
    segments = []
    for label in order:
        row = drive(stack, stack.sites["on"], on_path if label == "on" else off_path, connections,
                    durations.cost_segment_s, token=token)
        row["site"] = label
        segments.append(row)
        log(f"{what:7s} {label:3s} {describe(row)}")
    on = [row for row in segments if row["site"] == "on"]
    off = [row for row in segments if row["site"] == "off"]
    rps_on = sum(row["rps"] for row in on) / len(on)
    rps_off = sum(row["rps"] for row in off) / len(off)
    cpu_on = sum(row["site_cpu_ms_per_request"] for row in on) / len(on)
    cpu_off = sum(row["site_cpu_ms_per_request"] for row in off) / len(off)
    return {
        "endpoint": on_path,
        "baseline": off_path,
        "connections": connections,
        "segment_s": durations.cost_segment_s,
        "order": order,
        "rps_on": round(rps_on, 1),
        "rps_off": round(rps_off, 1),
        "throughput_ratio_on_over_off": round(rps_on / rps_off, 4),
        "cost": round(1 - rps_on / rps_off, 4),
        "site_cpu_ms_per_request_on": round(cpu_on, 3),
        "site_cpu_ms_per_request_off": round(cpu_off, 3),
        # What the throughput cost would be if the site were CPU-bound on cores of its own.
        "cpu_cost": round(1 - cpu_off / cpu_on, 4),
        "p95_on_ms": round(max(row["p95_ms"] for row in on), 2),
        "p95_off_ms": round(max(row["p95_ms"] for row in off), 2),
        "segments": segments,
    }


def one_run(stack: Stack, args, durations: Durations, number: int) -> dict:
    on = stack.sites["on"]
    started = dt.datetime.now(dt.timezone.utc)
    log(f"run {number}: load average {os.getloadavg()}")
    run = {"run": number, "started_at": started.isoformat(timespec="seconds"),
           "loadavg_at_start": [round(v, 2) for v in os.getloadavg()]}
    # Warm-up, not recorded: every worker's pools, policies and connections made.
    for label in ("on", "off"):
        drive(stack, stack.sites[label], GUARDED_PATH, 8, durations.warmup_s)
        drive(stack, stack.sites[label], API_PATH, 8, durations.warmup_s, token=True)
    drive(stack, on, UNCOUNTED[GUARDED_PATH], 8, durations.warmup_s)
    drive(stack, on, UNCOUNTED[API_PATH], 8, durations.warmup_s, token=True)
    drive(stack, on, BARE_PATH, 8, durations.warmup_s)

    run["ramp"] = ramp(stack, on, durations)
    run["sustainable"] = sustainable(run["ramp"])

    steady_c = args.steady_connections
    run["steady"] = drive(stack, on, GUARDED_PATH, steady_c, durations.steady_s)
    log(f"steady {describe(run['steady'])}")
    run["steady_api"] = drive(stack, on, API_PATH, steady_c, durations.api_s, token=True)
    log(f"steady {describe(run['steady_api'])}")

    run["spike"] = spike(stack, on, steady_c, args.spike_connections, durations.spike_phase_s)

    run["rate_limit_cost"] = {
        "guarded": rate_limit_cost(stack, GUARDED_PATH, steady_c, durations, token=False),
        "api": rate_limit_cost(stack, API_PATH, steady_c, durations, token=True),
    }
    run["bare"] = bare_cost(stack, steady_c, durations)
    run["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    run["duration_s"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
    return run


# -- soak and stress (opt-in: --scenario soak, --scenario stress) ---------------------------------

# The product's tables in the database ``load`` (the apps' labels), sampled by the soak.
PRODUCT_TABLES = r"^(integrations|dlq|monitoring)_"
# Responses the site may give under stress: 200, the guarded view's 503 (a failed guarded call,
# naming its category) and the rate limiter's 429. Anything else is a failure of the scenario.
SHED_STATUSES = {"200", "429", "503"}
# Lines of a gunicorn log that mean a worker died, hung or was replaced.
WORKER_TROUBLE = re.compile(r"WORKER TIMEOUT|Worker exiting|Booting worker|was sent SIG|Traceback|Worker \(pid:\d+\)")


def worker_pids(site: Site) -> list[int]:
    return sorted(_children(site.proc.pid))


def _status_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def workers_sample(site: Site) -> dict:
    """RSS and open file descriptors of each gunicorn worker (and their sums)."""
    workers = {}
    for pid in worker_pids(site):
        try:
            workers[pid] = {"rss_mb": round(_status_kb(pid, "VmRSS") / 1024, 2),
                            "fds": len(os.listdir(f"/proc/{pid}/fd"))}
        except FileNotFoundError:  # a worker that exited between the listing and the read
            continue
    return {"workers": workers,
            "rss_mb": round(sum(w["rss_mb"] for w in workers.values()), 2),
            "fds": sum(w["fds"] for w in workers.values())}


def redis_sample() -> dict:
    """This benchmark's keys (db 1) and their memory (MEMORY USAGE, sampled), and the whole
    server's used memory (other engineers' runs use the server too)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(count=1000))
        ours = sum(client.memory_usage(key) or 0 for key in keys)
        return {"keys": len(keys), "keys_memory_mb": round(ours / 2**20, 3),
                "used_memory_mb": round(client.info("memory")["used_memory"] / 2**20, 2)}
    finally:
        client.close()


def postgres_sample() -> dict:
    """Size on disk (with indexes and TOAST) and live rows of each product table of the database ``load``."""
    query = ("SELECT relname, pg_total_relation_size(relid), n_live_tup FROM pg_stat_user_tables "
             f"WHERE relname ~ '{PRODUCT_TABLES}' ORDER BY relname")
    out = subprocess.run(["psql", "-h", HOST, "-U", "postgres", "-d", PG_DATABASE, "-tAF", "\t", "-c", query],
                         capture_output=True, text=True, check=True).stdout
    tables = {}
    for line in out.strip().splitlines():
        name, size, rows = line.split("\t")
        tables[name] = {"bytes": int(size), "rows": int(rows)}
    return {"tables": tables, "total_mb": round(sum(t["bytes"] for t in tables.values()) / 2**20, 3),
            "rows": sum(t["rows"] for t in tables.values())}


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute; None with fewer than 2 points."""
    if len(points) < 2:
        return None
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return None
    return 60 * sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def _brief_load(row: dict) -> dict:
    return {key: row[key] for key in ("connections", "duration_s", "requests", "rps", "p50_ms", "p95_ms", "p99_ms",
                                      "max_ms", "errors", "error_rate", "non_2xx", "socket_errors",
                                      "site_cpu_ms_per_request", "command")}


def gunicorn_trouble(site: Site, since: int) -> list[str]:
    """The lines of the site's gunicorn log after byte ``since`` that say a worker died or was replaced."""
    with open(site.log_path, "rb") as log_file:
        log_file.seek(since)
        text = log_file.read().decode(errors="replace")
    return [line for line in text.splitlines() if WORKER_TROUBLE.search(line)]


def soak(stack: Stack, site: Site, args) -> dict:
    """Steady load for --soak-minutes, as back-to-back wrk segments of --sample-s; after each, the
    workers' RSS and descriptors, Redis and the product tables are sampled. Drift is the least-squares
    slope per minute over the samples after the first minute (the rate-limit log's window fills in it)."""
    connections, total_s, every_s = args.soak_connections, args.soak_minutes * 60, args.sample_s
    drive(stack, site, GUARDED_PATH, 8, 5)  # warm-up, not recorded
    pids_before = worker_pids(site)
    log_offset = site.log_path.stat().st_size
    started = time.monotonic()
    samples = [{"t_s": 0.0, "process": workers_sample(site), "redis": redis_sample(), "postgres": postgres_sample()}]
    while (segment_s := int(min(every_s, total_s - (time.monotonic() - started)))) >= 1:  # wrk takes whole seconds
        row = drive(stack, site, GUARDED_PATH, connections, segment_s)
        sample = {"t_s": round(time.monotonic() - started, 1), "load": _brief_load(row),
                  "process": workers_sample(site), "redis": redis_sample(), "postgres": postgres_sample()}
        samples.append(sample)
        log(f"soak   t={sample['t_s']:5.0f}s {row['rps']:.0f} req/s p95 {row['p95_ms']:.1f} ms errors {row['errors']}; "
            f"workers RSS {sample['process']['rss_mb']:.1f} MB fds {sample['process']['fds']}; redis keys "
            f"{sample['redis']['keys']}; tables {sample['postgres']['total_mb']:.2f} MB")
    loads = [sample["load"] for sample in samples[1:]]
    requests = sum(row["requests"] for row in loads)
    errors = sum(row["errors"] for row in loads)
    settled = [sample for sample in samples if sample["t_s"] >= 60] or samples

    def drift(value) -> float | None:
        slope = slope_per_minute([(sample["t_s"], value(sample)) for sample in settled])
        return None if slope is None else round(slope, 4)

    third = max(1, len(loads) // 3)
    return {
        "connections": connections, "minutes": args.soak_minutes, "sample_s": every_s,
        "duration_s": round(time.monotonic() - started, 1),
        "requests": requests, "errors": errors, "error_rate": round(errors / requests, 6) if requests else 0.0,
        "rps_mean": round(statistics.fmean(row["rps"] for row in loads), 1),
        "p95_ms": {"first_third_median": statistics.median(row["p95_ms"] for row in loads[:third]),
                   "last_third_median": statistics.median(row["p95_ms"] for row in loads[-third:]),
                   "max": max(row["p95_ms"] for row in loads)},
        "drift_per_minute": {
            "workers_rss_mb": drift(lambda sample: sample["process"]["rss_mb"]),
            "workers_fds": drift(lambda sample: sample["process"]["fds"]),
            "redis_keys": drift(lambda sample: sample["redis"]["keys"]),
            "redis_keys_memory_mb": drift(lambda sample: sample["redis"]["keys_memory_mb"]),
            "redis_used_memory_mb": drift(lambda sample: sample["redis"]["used_memory_mb"]),
            "product_tables_mb": drift(lambda sample: sample["postgres"]["total_mb"]),
            "product_table_rows": drift(lambda sample: sample["postgres"]["rows"]),
        },
        "drift_from_s": settled[0]["t_s"],
        "workers_replaced": pids_before != worker_pids(site),
        "gunicorn_trouble": gunicorn_trouble(site, log_offset),
        "samples": samples,
    }


def set_upstream_faults(stack: Stack, **faults: float) -> dict:
    query = "&".join(f"{name}={value:g}" for name, value in faults.items())
    with urllib.request.urlopen(f"http://{HOST}:{stack.upstream_port}/__fault?{query}", timeout=5) as response:
        return json.loads(response.read())


def stress(stack: Stack, site: Site, args) -> dict:
    """A healthy baseline; then connections step far past saturation twice, the upstream degraded
    (--degraded-fail-rate of 503s, under the breaker's threshold, and --spike-rate of --spike-ms
    spikes), then failing (--fail-rate of 503s); then the faults removed and the
    baseline load again until two segments in a row are clean (no 503: only 200 and the rate
    limit's 429; p95 within the target or twice the baseline's). What must hold: only 200, 429 and the guarded 503 (naming its category),
    no worker replaced or dead, and recovery."""
    baseline_c, step_s = args.stress_baseline_connections, args.stress_step_s
    set_upstream_faults(stack, fail_rate=0, spike_rate=0, spike_ms=0)
    drive(stack, site, GUARDED_PATH, baseline_c, 5)  # warm-up, not recorded
    pids_before = worker_pids(site)
    log_offset = site.log_path.stat().st_size
    phases = []

    def phase(name: str, connections: int, duration_s: float) -> dict:
        row = drive(stack, site, GUARDED_PATH, connections, duration_s, script=STATUSES_LUA)
        row["phase"] = name
        row["t_s"] = round(time.monotonic() - started, 1)
        phases.append(row)
        log(f"stress {name:9s} c={connections:<5d} {row['rps']:.0f} req/s p95 {row['p95_ms']:.1f} ms; statuses "
            f"{row.get('statuses')} 503 by category {row.get('categories_503')}; socket errors {row['socket_errors']}")
        return row

    started = time.monotonic()
    baseline = phase("baseline", baseline_c, step_s)
    faults = {
        # failing under the breaker's rate threshold, and slow now and then: retries and slow calls
        "degraded": {"fail_rate": args.degraded_fail_rate, "spike_rate": args.spike_rate, "spike_ms": args.spike_ms},
        # failing past it: the breaker opens and sheds
        "failing": {"fail_rate": args.fail_rate, "spike_rate": 0, "spike_ms": 0},
    }
    fault_on_at = time.monotonic()
    for stage, stage_faults in faults.items():
        set_upstream_faults(stack, **stage_faults)
        for connections in args.stress_connections:
            phase(stage, connections, step_s)
    set_upstream_faults(stack, fail_rate=0, spike_rate=0, spike_ms=0)
    fault_off_at = time.monotonic()
    p95_bound = max(P95_TARGET_MS, 2 * baseline["p95_ms"])
    clean_in_a_row, recovered_after_s = 0, None
    while time.monotonic() - fault_off_at < args.recovery_max_s:
        row = phase("recovery", baseline_c, args.recovery_step_s)
        # clean: no 503 (the guarded call succeeds again); a 429 is the inbound limit doing its job for the
        # one client wrk is, not a failure of the site
        answered = row.get("statuses", {})
        # (wrk's "errors" count every non-2xx, the 429s included: only its socket errors matter here)
        clean = (set(answered) <= {"200", "429"} and answered.get("200", 0) > 0
                 and not any(row["socket_errors"].values()) and row["p95_ms"] < p95_bound)
        if clean and clean_in_a_row == 0:
            # When the first clean segment began, counted from when the faults stopped.
            recovered_after_s = round(time.monotonic() - fault_off_at - row["duration_s"], 1)
        clean_in_a_row = clean_in_a_row + 1 if clean else 0
        if not clean:
            recovered_after_s = None
        if clean_in_a_row == 2:
            break
    statuses: dict[str, int] = {}
    categories: dict[str, int] = {}
    for row in phases:
        for key, count in row.get("statuses", {}).items():
            statuses[key] = statuses.get(key, 0) + count
        for key, count in row.get("categories_503", {}).items():
            categories[key] = categories.get(key, 0) + count
    unexpected = {key: count for key, count in statuses.items() if key not in SHED_STATUSES}
    socket_errors = {kind: sum(row["socket_errors"][kind] for row in phases) for kind in phases[0]["socket_errors"]}
    trouble = gunicorn_trouble(site, log_offset)
    checks = {
        "only_200_429_and_guarded_503": not unexpected and not categories.get("none"),
        "no_worker_replaced": pids_before == worker_pids(site) and not trouble,
        "recovered": clean_in_a_row == 2,
    }
    return {
        "baseline_connections": baseline_c, "stress_connections": list(args.stress_connections), "step_s": step_s,
        "faults": faults, "rate_limit": site.rate_limits.get("load"),
        "fault_on_s": round(fault_off_at - fault_on_at, 1),
        "statuses": statuses, "categories_503": categories, "unexpected_statuses": unexpected,
        "socket_errors": socket_errors, "recovered_after_s": recovered_after_s, "recovery_p95_bound_ms": p95_bound,
        "gunicorn_trouble": trouble, "checks": checks, "passed": all(checks.values()), "phases": phases,
    }


def _scenario_header(scenario: str, meta: dict) -> str:
    return (f"# {scenario.title()} results\n\nGenerated by `benchmarks/load/run.py --scenario {scenario}`; do not "
            f"edit by hand.\n\nProduced by `{meta['command']}` on {meta['generated_at']} ({meta['cpus']} cores, "
            f"Python {meta['python']}, {meta['wrk']}; load average at the start "
            f"{' '.join(map(str, meta['loadavg_at_start']))}). The site: {meta['site']}. ")


def soak_markdown(meta: dict, result: dict) -> str:
    drift, p95 = result["drift_per_minute"], result["p95_ms"]

    def per_min(value, unit):
        return "n/a" if value is None else f"{value:+.3f} {unit}/min"

    first, last = result["samples"][0], result["samples"][-1]
    out = [
        _scenario_header("soak", meta),
        "Rate limits on (every request counted in Redis). "
        f"{result['connections']} connections on `{GUARDED_PATH}` for {result['duration_s']:.0f} s, as wrk "
        f"segments of {result['sample_s']} s back to back; after each, the workers' RSS and open descriptors "
        "(/proc), Redis db 1's keys and the server's used memory (shared with other engineers' runs), and the "
        f"product tables of the database `{PG_DATABASE}` (size with indexes, live rows) were sampled.\n\n",
        "## Summary\n\n",
        f"- {result['requests']:,} requests, {result['errors']} errors ({result['error_rate']:.3%}); "
        f"{result['rps_mean']:.0f} req/s on average.\n",
        f"- p95: median {p95['first_third_median']:.1f} ms in the first third, {p95['last_third_median']:.1f} ms "
        f"in the last third; worst segment {p95['max']:.1f} ms.\n",
        f"- Drift (least-squares slope per minute, samples from t = {result['drift_from_s']:.0f} s on): workers' "
        f"RSS {per_min(drift['workers_rss_mb'], 'MB')} (all workers together; {first['process']['rss_mb']:.1f} MB "
        f"at the start, {last['process']['rss_mb']:.1f} MB at the end), open descriptors "
        f"{per_min(drift['workers_fds'], 'fds')} ({first['process']['fds']} to {last['process']['fds']}), Redis "
        f"keys {per_min(drift['redis_keys'], 'keys')} ({first['redis']['keys']} to {last['redis']['keys']}), "
        f"their memory {per_min(drift['redis_keys_memory_mb'], 'MB')} ({first['redis']['keys_memory_mb']:.2f} to "
        f"{last['redis']['keys_memory_mb']:.2f} MB), the Redis server's used memory (all its users) "
        f"{per_min(drift['redis_used_memory_mb'], 'MB')}, product tables "
        f"{per_min(drift['product_tables_mb'], 'MB')} ({first['postgres']['total_mb']:.2f} to "
        f"{last['postgres']['total_mb']:.2f} MB; rows {per_min(drift['product_table_rows'], 'rows')}, "
        f"{first['postgres']['rows']} to {last['postgres']['rows']}: the call statistics add one row per "
        "integration and minute).\n",
        f"- Workers replaced during the soak: {'yes' if result['workers_replaced'] else 'no'}; gunicorn log lines "
        f"about dead or replaced workers: {len(result['gunicorn_trouble'])}.\n\n",
        "## Samples\n\n",
        "| t (s) | req/s | p50 ms | p95 ms | p99 ms | errors | site CPU ms/req | workers RSS MB | fds | redis keys "
        "| their MB | redis server MB | tables MB |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    ]
    for sample in result["samples"]:
        row = sample.get("load")
        cells = (f"{row['rps']:.0f} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['p99_ms']:.1f} | "
                 f"{row['errors']} | {row['site_cpu_ms_per_request']:.2f}" if row else "start | | | | |")
        out.append(f"| {sample['t_s']:.0f} | {cells} | {sample['process']['rss_mb']:.1f} | {sample['process']['fds']} "
                   f"| {sample['redis']['keys']} | {sample['redis']['keys_memory_mb']:.2f} "
                   f"| {sample['redis']['used_memory_mb']:.1f} "
                   f"| {sample['postgres']['total_mb']:.2f} |\n")
    out.append("\n## Product tables, first and last sample\n\n| table | bytes at start | bytes at end | rows at start "
               "| rows at end |\n| --- | --- | --- | --- | --- |\n")
    for name, end in last["postgres"]["tables"].items():
        begin = first["postgres"]["tables"].get(name, {"bytes": 0, "rows": 0})
        out.append(f"| `{name}` | {begin['bytes']:,} | {end['bytes']:,} | {begin['rows']:,} | {end['rows']:,} |\n")
    if result["samples"][1:]:
        out.append(f"\nCommand of each segment: `{result['samples'][1]['load'].get('command', '')}`\n")
    return "".join(out)


def stress_markdown(meta: dict, result: dict) -> str:
    limit, degraded, failing = result["rate_limit"], result["faults"]["degraded"], result["faults"]["failing"]
    out = [
        _scenario_header("stress", meta),
        f"A real rate limit on `{GUARDED_PATH}` "
        f"({limit['limit']} requests per {limit['window_s']:g} s for the one client wrk is). Phases: a baseline of "
        f"{result['baseline_connections']} connections; then connections step "
        f"{', '.join(map(str, result['stress_connections']))} ({result['step_s']} s each) twice, with the upstream "
        f"degraded ({degraded['fail_rate']:.0%} of its answers 503, under the breaker's 50 % threshold, and "
        f"{degraded['spike_rate']:.0%} delayed {degraded['spike_ms']:g} ms), then failing ({failing['fail_rate']:.0%} "
        "of its answers 503); then the faults "
        "removed and the baseline load again until two segments in a row are clean (no 503: only 200 and the "
        "rate limit's 429, p95 under "
        f"{result['recovery_p95_bound_ms']:.0f} ms). Statuses are counted by wrk (statuses.lua); a 503 is the "
        "guarded view's (a failed guarded call, named by its category) or \"none\".\n\n",
        "## Checks\n\n",
    ]
    for name, held in result["checks"].items():
        out.append(f"- {name.replace('_', ' ')}: **{'yes' if held else 'NO'}**\n")
    out.append(f"\nAll responses: {result['statuses']}; the 503s by category: {result['categories_503']}; socket "
               f"errors: {result['socket_errors']}. Recovered "
               + (f"{result['recovered_after_s']:.0f} s after the faults stopped" if result["recovered_after_s"] is not None
                  else "not within the bound")
               + f" (the breaker's reset timeout is the external_api preset's 30 s). gunicorn log lines about dead or "
               f"replaced workers: {len(result['gunicorn_trouble'])}.\n\n")
    out.append("## Phases\n\n| phase | t (s) | connections | req/s | p50 ms | p95 ms | p99 ms | 200 | 429 | 503 (by category) "
               "| other statuses | socket errors | site CPU ms/req |\n"
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    for row in result["phases"]:
        statuses = dict(row.get("statuses", {}))
        ok, limited, shed = statuses.pop("200", 0), statuses.pop("429", 0), statuses.pop("503", 0)
        categories = ", ".join(f"{key} {count}" for key, count in sorted(row.get("categories_503", {}).items()))
        socket_errors = ", ".join(f"{kind} {count}" for kind, count in row["socket_errors"].items() if count) or "0"
        per_request = row["site_cpu_ms_per_request"]
        out.append(f"| {row['phase']} | {row['t_s']:.0f} | {row['connections']} | {row['rps']:.0f} | {row['p50_ms']:.1f} "
                   f"| {row['p95_ms']:.1f} | {row['p99_ms']:.1f} | {ok} | {limited} | {shed}"
                   f"{f' ({categories})' if categories else ''} | {statuses or ''} | {socket_errors} "
                   f"| {'' if per_request is None else f'{per_request:.2f}'} |\n")
    out.append(f"\nCommand per phase: `{result['phases'][0]['command']}`, with -c (and -t, at most 2) set to the "
               "phase's connections.\n")
    return "".join(out)


# -- profiling (--profile) -------------------------------------------------------------------------


PROFILE_RATE_HZ = 250
# Frames every sample of a worker thread passes through: they say nothing about where time goes.
_BOILERPLATE = re.compile(r"^(process \d+|<module>|run \(wsgiapp|Arbiter\.|BaseApplication\.|Application\.run|"
                          r"Worker\.init_process|ThreadWorker\.run|SyncWorker\.run|Thread\.|_worker \(thread|"
                          r"_WorkItem\.run|convert_exception_to_response|MiddlewareMixin\.__call__)")


def profile(stack: Stack, args, durations: Durations, workdir: Path) -> dict:
    """py-spy on every worker while steady load runs: guarded with limits on and off, the API with them on.

    py-spy samples each thread that is running or waiting for a CPU (not one blocked on I/O), so a
    frame's samples per request are the CPU time, plus the time spent waiting for a core, that one
    request spends in it.
    """
    pyspy = shutil.which("py-spy") or args.py_spy
    if not pyspy or not Path(pyspy).exists():
        log("--profile: py-spy not found (pip install py-spy into a scratch venv; --py-spy PATH)")
        return {}
    results = {}
    duration = max(durations.steady_s // 2, 8)
    for name, label, path, token in (("guarded, limits on", "on", GUARDED_PATH, False),
                                     ("guarded, limits off", "off", GUARDED_PATH, False),
                                     ("api, limits on", "on", API_PATH, True)):
        site = stack.sites[label]
        out = workdir / f"profile-{label}-{path.strip('/').replace('/', '-')}.txt"
        spy = subprocess.Popen([pyspy, "record", "--pid", str(site.proc.pid), "--subprocesses", "--nonblocking",
                                "--rate", str(PROFILE_RATE_HZ), "--format", "raw", "--output", str(out),
                                "--duration", str(duration + 2)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        row = drive(stack, site, path, args.steady_connections, duration, token=token)
        spy.wait()
        results[name] = {"load": row, "frames": summarize_profile(out, row["requests"]), "raw": str(out)}
        log(f"profile {name}: {describe(row)} (under py-spy)")
    return results


def summarize_profile(path: Path, requests: int, top: int = 30) -> list[dict]:
    """From py-spy's collapsed stacks: per function, samples and ms (running or runnable) per request."""
    if not path.exists() or not requests:
        return []
    counts: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        for frame in {_frame(f) for f in stack.split(";")}:
            if not _BOILERPLATE.match(frame):
                counts[frame] = counts.get(frame, 0) + int(count)
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
    return [{"frame": frame, "samples": count,
             "ms_per_request": round(count / PROFILE_RATE_HZ * 1000 / requests, 3)} for frame, count in ranked]


def _frame(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)": lines vary within one function
    return re.sub(r"\((?:.*/)?([^/:]+):\d+\)", r"(\1)", frame.strip())


# -- the report ------------------------------------------------------------------------------------


def write_results(results: dict) -> None:
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    RESULTS_MD.write_text(markdown(results))
    log(f"wrote {RESULTS_JSON.relative_to(ROOT)} and {RESULTS_MD.relative_to(ROOT)}")


def _row(row: dict, first: str) -> str:
    cpu = row.get("cpu")
    per_request = row.get("site_cpu_ms_per_request")
    cores = (f"{cpu['site_cores']} / {cpu['redis_cores']} / {cpu['postgres_cores']} / {cpu['wrk_cores']} / "
             f"{cpu['other_cores']}" if cpu else "")
    return (f"| {first} | {row['connections']} | {row['rps']:.0f} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} "
            f"| {row['p99_ms']:.1f} | {row['errors']} ({row['error_rate']:.3%}) "
            f"| {'' if per_request is None else f'{per_request:.2f}'} | {cores} "
            f"| {cpu['loadavg_1m_before'] if cpu else ''} |\n")


HEADER = ("| {first} | connections | req/s | p50 ms | p95 ms | p99 ms | errors | site CPU ms/req "
          "| cores: site / redis / pg / wrk / other | load 1m before |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")


def pair_costs(segments: list[dict]) -> tuple[float, float]:
    """Median over the interleaved (on, off) pairs of 1 - on/off req/s, and of 1 - off/on CPU per request.

    One slow segment (a stall of the shared machine) moves a mean over a few segments by more than the
    effect measured; the median of adjacent pairs is not moved by one outlier.
    """
    throughput, cpu = [], []
    for first, second in zip(segments[0::2], segments[1::2]):
        on, off = (first, second) if first["site"] == "on" else (second, first)
        throughput.append(1 - on["rps"] / off["rps"])
        cpu.append(1 - off["site_cpu_ms_per_request"] / on["site_cpu_ms_per_request"])
    return statistics.median(throughput), statistics.median(cpu)


def _cost(cost: dict) -> str:
    median_rps, median_cpu = pair_costs(cost["segments"])
    return (f"median of pairs {median_rps:+.1%}, in CPU {median_cpu:+.1%}; means {cost['cost']:+.1%} "
            f"({cost['rps_on']:.0f} vs {cost['rps_off']:.0f} req/s), in CPU {cost['cpu_cost']:+.1%} "
            f"({cost['site_cpu_ms_per_request_on']:.2f} vs {cost['site_cpu_ms_per_request_off']:.2f} ms/req)")


def _bare(bare: dict) -> str:
    median_cost, _ = pair_costs(bare["segments"])
    return (f"guarded / bare throughput {bare['throughput_ratio_on_over_off']:.3f} (means: {bare['rps_on']:.0f} vs "
            f"{bare['rps_off']:.0f} req/s; median of pairs {1 - median_cost:.3f}; target >= {BARE_RATIO_TARGET}), "
            f"site CPU per request {bare['site_cpu_ms_per_request_on']:.2f} ms guarded vs "
            f"{bare['site_cpu_ms_per_request_off']:.2f} ms bare")


def _step(step: dict | None) -> str:
    return "none" if step is None else f"{step['rps']:.0f} req/s at {step['connections']} conn., p95 {step['p95_ms']:.0f} ms"


def _steady(row: dict) -> str:
    return f"{row['rps']:.0f} req/s, p95 {row['p95_ms']:.0f} ms, {row['error_rate']:.2%} errors"


def markdown(results: dict) -> str:
    meta, runs = results["meta"], results["runs"]
    out = [
        "# Load benchmark results\n\n",
        "Generated by benchmarks/load/run.py; do not edit by hand.\n\n",
        f"Produced by `{meta['command']}` on {meta['generated_at']} ({meta['cpus']} cores, "
        f"Python {meta['python']}, {meta['wrk']}). The site: {meta['site']}. Upstream: {meta['upstream']}. "
        f"State: PostgreSQL `{PG_DATABASE}` at {HOST}:5432, Redis db 1 at {HOST}:6379, key prefix "
        f"`{KEY_PREFIX}`. Every request to `{GUARDED_PATH}` makes one guarded call "
        "(`integrations.http.Client`, integration `load_upstream`, external_api preset, no cache) to the "
        f"upstream; `{API_PATH}` is read with a staff user's API token.\n\n",
        "wrk is closed-loop: each connection sends its next request when the previous answer arrives, so a "
        "row is a fixed number of connections and req/s is what the site achieved at that concurrency, not an "
        "offered rate. wrk, the site, the upstream, PostgreSQL and Redis share the machine's two cores with "
        "whatever else runs: \"cores\" says how many cores' worth each used during the row (redis: the whole "
        "Redis server, which other engineers' runs also use; pg: the backends of the database `load`; "
        "\"other\": everything else on the machine, other engineers' test runs above all). \"site CPU "
        "ms/req\" is the gunicorn master's and workers' CPU time per answered request. Errors are responses "
        ">= 400 plus socket errors and timeouts (5 s).\n\n",
        f"Targets (issue 7): p95 < {P95_TARGET_MS:g} ms and errors < {ERROR_RATE_TARGET:.1%} at "
        f"{RATE_TARGET:,.0f} req/s on the guarded endpoint, or the most this machine sustains; the rate-limit "
        f"middleware costs < {MIDDLEWARE_COST_TARGET:.0%} of throughput.\n\n",
        "## Summary\n\n",
        "| run | started (UTC) | load avg at start | sustained at saturation (p95 < 200 ms, errors < 0.1 %) "
        "| best step | steady, guarded | steady, API | rate-limit cost, guarded | rate-limit cost, API |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    ]
    for run in runs:
        held = run["sustainable"]
        cost = run["rate_limit_cost"]
        out.append(f"| {run['run']} | {run['started_at']} | {' '.join(map(str, run['loadavg_at_start']))} "
                   f"| {_step(held['saturated'])} | {_step(held['best'])} | {_steady(run['steady'])} "
                   f"| {_steady(run['steady_api'])} | {_cost(cost['guarded'])} | {_cost(cost['api'])} |\n")
    out.append("\nSustained at saturation: the ramp's passing step with the most connections (the last before "
               "p95 passed 200 ms), i.e. the site saturated and still within the targets. Best step: the "
               "passing step with the highest req/s (one step can be lucky on a shared machine). Rate-limit cost: "
               "1 - (req/s counted) / (req/s not counted), same site and connections, interleaved segments of "
               "one run (negative: the counted side was faster, i.e. noise); in CPU: 1 - (site CPU per "
               "request, not counted) / (counted). \"Median of pairs\" takes it for each adjacent on/off pair "
               "of segments and reports the median, which one stalled segment does not move; \"means\" "
               "compares the averages of all segments.\n\n")

    out.append("## Steady load (fixed connections)\n\n")
    out.append(HEADER.format(first="run, endpoint"))
    for run in runs:
        out.append(_row(run["steady"], f"{run['run']}, `{GUARDED_PATH}`"))
        out.append(_row(run["steady_api"], f"{run['run']}, `{API_PATH}`"))
    out.append(f"\nCommands:\n\n    {runs[0]['steady']['command']}\n    {runs[0]['steady_api']['command']}\n\n")

    out.append("## Ramp to saturation (guarded endpoint)\n\n")
    out.append("Connections step up until p95 passes 200 ms or errors pass 0.1 % (that step is the last).\n\n")
    out.append(HEADER.format(first="run"))
    for run in runs:
        for row in run["ramp"]:
            out.append(_row(row, str(run["run"])))
    out.append(f"\nCommand per step: `{runs[0]['ramp'][0]['command']}`, with -c (and -t, at most 2) set to the "
               "step's connections.\n\n")

    out.append("## Spike (guarded endpoint)\n\n")
    for run in runs:
        spike_result = run["spike"]
        out.append(f"Run {run['run']}: {spike_result['baseline_connections']} connections throughout; during the "
                   f"middle phase a second wrk adds {spike_result['burst_connections']} connections at once "
                   f"(the site's total then {spike_result['during_total_rps']:.0f} req/s).\n\n")
        out.append(HEADER.format(first="phase"))
        for phase, row in spike_result["phases"].items():
            out.append(_row(row, phase))
        out.append("\n")
    phases = runs[0]["spike"]["phases"]
    out.append(f"Commands: `{phases['before']['command']}` (before, during, after, one after the other) and "
               f"`{phases['burst']['command']}` (burst, started with \"during\").\n\n")

    out.append("## Rate-limit middleware cost\n\n")
    out.append("One gunicorn master, the one of the scenarios above: its `RESILIENCE_RATE_LIMITS` has the "
               "default groups plus `load` (path `/load/guarded/`), every limit 10^9 and window 60 s, so every "
               "request to those paths is counted in Redis and none is refused. \"on\" drives the endpoint; "
               "\"off\" drives the same view at a path no group matches (`/load/uncounted/guarded/`, "
               "`/load/uncounted/api/dlq/stats/`), so the same workers answer both and only the counting "
               "differs (the middleware's no-match path is a few prefix comparisons). Driven one at a time, in "
               "the order shown. By default only `/api/` (and the admin login) is limited: `/load/guarded/` is "
               "counted here only through the added group.\n\n")
    for run in runs:
        for cost in run["rate_limit_cost"].values():
            out.append(f"Run {run['run']}, `{cost['endpoint']}`: ratio on/off "
                       f"{cost['throughput_ratio_on_over_off']:.3f}, cost {_cost(cost)}.\n\n")
            out.append(HEADER.format(first="limits"))
            for row in cost["segments"]:
                out.append(_row(row, row["site"]))
            out.append("\n")
    if any("bare" in run for run in runs):
        out.append("## The pipeline's cost at the HTTP level: guarded vs bare httpx\n\n")
        out.append(f"The same site and workers; \"on\" drives `{UNCOUNTED[GUARDED_PATH]}` (the guarded view: "
                   "`integrations.http.Client`, the external_api preset's breaker, retry, timeouts, bulkhead and "
                   f"quota, shared in Redis), \"off\" drives `{BARE_PATH}` (the same upstream GET with a bare, "
                   "kept-alive `httpx.Client`); no rate-limit group matches either path. Interleaved, in the order "
                   f"shown. Target: guarded / bare throughput >= {BARE_RATIO_TARGET}.\n\n")
        for run in runs:
            if "bare" not in run:
                continue
            out.append(f"Run {run['run']}: {_bare(run['bare'])}.\n\n")
            out.append(HEADER.format(first="view"))
            for row in run["bare"]["segments"]:
                out.append(_row(row, "guarded" if row["site"] == "on" else "bare"))
            out.append("\n")
    if results.get("profile"):
        out.append("## Profile (py-spy, --profile)\n\n")
        out.append("py-spy sampled every worker at " f"{PROFILE_RATE_HZ} Hz while the load below ran; a thread is "
                   "sampled when it runs or waits for a core, not while it waits on I/O. \"ms/req\" is a "
                   "function's samples (inclusive of what it calls) over the requests answered: CPU, plus "
                   "waiting for a core, per request. The load itself is slowed by the sampling.\n")
        for name, prof in results["profile"].items():
            row = prof["load"]
            out.append(f"\n`{row['endpoint']}`, limits {row['site']}: {row['rps']:.0f} req/s at "
                       f"{row['connections']} connections under py-spy.\n\n| function | samples | ms/req |\n"
                       "| --- | --- | --- |\n")
            for item in prof["frames"]:
                out.append(f"| `{item['frame']}` | {item['samples']} | {item['ms_per_request']:.3f} |\n")
    return "".join(out)


def serve(stack: Stack) -> None:
    """Keep the stack up for experiments by hand (wrk, py-spy) until SIGINT or SIGTERM."""
    print(json.dumps({"on": stack.sites["on"].url, "off": stack.sites["off"].url,
                      "on_master_pid": stack.sites["on"].proc.pid, "off_master_pid": stack.sites["off"].proc.pid,
                      "token": stack.token}), flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIGINT ignored
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


# -- main ------------------------------------------------------------------------------------------


def scenario_meta(args, argv, wrk_version: str, rate_limits: dict) -> dict:
    return {
        "command": " ".join([".venv/bin/python", "benchmarks/load/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "wrk": wrk_version,
        "site": (f"gunicorn -c deploy/gunicorn.conf.py, {args.workers} {args.worker_class} workers"
                 + (f" x {args.threads} threads" if args.worker_class == "gthread" else "")
                 + ", DEBUG=0, settings benchmarks.load.settings"),
        "rate_limits": rate_limits,
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def run_scenario(args, argv) -> int:
    """--scenario soak or stress: one site, that scenario, its own output files (SCENARIO_FILES)."""
    wrk_version = preflight()
    if args.scenario == "stress":
        rate_limits = {**RATE_LIMITS_ON, "load": {**RATE_LIMITS_ON["load"], "limit": args.stress_rate_limit,
                                                  "window_s": 10}}
    else:
        rate_limits = RATE_LIMITS_ON
    meta = scenario_meta(args, argv, wrk_version, rate_limits)
    workdir = Path(tempfile.mkdtemp(prefix=f"resilience-{args.scenario}-"))
    stack = Stack(args, workdir)
    try:
        stack.start_upstream()
        stack.prepare_database()
        site = stack.start_site(args.scenario, rate_limits)
        result = soak(stack, site, args) if args.scenario == "soak" else stress(stack, site, args)
    finally:
        stack.close()
        log(f"stopped gunicorn and the upstream; logs in {workdir}")
    meta["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    json_path, md_path = SCENARIO_FILES[args.scenario]
    if not args.no_write:
        json_path.write_text(json.dumps({"meta": meta, args.scenario: result}, indent=2) + "\n")
        md_path.write_text((soak_markdown if args.scenario == "soak" else stress_markdown)(meta, result))
        log(f"wrote {json_path.relative_to(ROOT)} and {md_path.relative_to(ROOT)}")
    if args.scenario == "soak":
        log(f"soak: {result['requests']} requests, error rate {result['error_rate']:.3%}, p95 "
            f"{result['p95_ms']}, drift per minute {result['drift_per_minute']}")
        return 0
    log(f"stress: checks {result['checks']}; statuses {result['statuses']}; recovered after "
        f"{result['recovered_after_s']} s")
    return 0 if result["passed"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke test, not figures)")
    parser.add_argument("--repeat", type=int, default=2, help="full runs, each reported (default 2)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers per master (default 4)")
    parser.add_argument("--worker-class", default="gthread", help="gunicorn worker class (default gthread)")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker (gthread only; default 4)")
    parser.add_argument("--steady-connections", type=int, default=32)
    parser.add_argument("--spike-connections", type=int, default=320,
                        help="connections added at once during the spike")
    parser.add_argument("--upstream-latency-ms", type=float, default=0.0)
    parser.add_argument("--profile", action="store_true", help="also profile the workers with py-spy")
    parser.add_argument("--py-spy", default="/tmp/load-pyspy/bin/py-spy", help="py-spy, if not on PATH")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results.json as it is")
    parser.add_argument("--serve", action="store_true",
                        help="start the stack, print its URLs and the token, and wait for SIGINT/SIGTERM")
    parser.add_argument("--rewrite-report", action="store_true",
                        help="rewrite RESULTS.md from results.json, run nothing")
    parser.add_argument("--scenario", choices=("default", "soak", "stress"), default="default",
                        help="default: the scenarios above, into results.json and RESULTS.md; soak or stress: "
                             "that scenario alone, into soak.json and SOAK.md or stress.json and STRESS.md")
    parser.add_argument("--soak-minutes", type=float, default=10.0, help="the soak's length (default 10)")
    parser.add_argument("--soak-connections", type=int, default=32, help="the soak's connections (default 32)")
    parser.add_argument("--sample-s", type=float, default=15.0, help="the soak's sampling interval (default 15 s)")
    parser.add_argument("--stress-baseline-connections", type=int, default=2,
                        help="before and after the faults (default 2: under the rate limit)")
    parser.add_argument("--stress-connections", type=lambda text: tuple(int(c) for c in text.split(",")),
                        default=(64, 128, 256, 512, 1024), help="the steps under faults (default 64,128,256,512,1024)")
    parser.add_argument("--stress-step-s", type=float, default=15.0, help="each stress phase (default 15 s)")
    parser.add_argument("--stress-rate-limit", type=int, default=8000,
                        help="the stress site's limit on /load/guarded/ per 10 s for the one client (default 8000)")
    parser.add_argument("--degraded-fail-rate", type=float, default=0.2,
                        help="the upstream's share of 503s in the degraded stage (default 0.2)")
    parser.add_argument("--spike-rate", type=float, default=0.05,
                        help="the upstream's share of latency spikes in the degraded stage (default 0.05)")
    parser.add_argument("--spike-ms", type=float, default=1500.0, help="a latency spike (default 1500 ms)")
    parser.add_argument("--fail-rate", type=float, default=0.6,
                        help="the upstream's share of 503s in the failing stage (default 0.6)")
    parser.add_argument("--recovery-step-s", type=float, default=5.0, help="each recovery segment (default 5 s)")
    parser.add_argument("--recovery-max-s", type=float, default=120.0,
                        help="how long recovery may take before the stress fails (default 120 s)")
    args = parser.parse_args(argv)
    if args.scenario != "default":
        return run_scenario(args, argv)
    durations = QUICK if args.quick else FULL
    if args.rewrite_report:
        results = json.loads(RESULTS_JSON.read_text())
        for run in results["runs"]:
            run["sustainable"] = sustainable(run["ramp"])
        write_results(results)
        return 0

    wrk_version = preflight()
    command = " ".join([".venv/bin/python", "benchmarks/load/run.py", *(argv if argv is not None else sys.argv[1:])])
    workdir = Path(tempfile.mkdtemp(prefix="resilience-load-"))
    stack = Stack(args, workdir)
    results = {"meta": {
        "command": command,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "wrk": wrk_version,
        "quick": args.quick,
        "site": (f"gunicorn -c deploy/gunicorn.conf.py, {args.workers} {args.worker_class} workers"
                 + (f" x {args.threads} threads" if args.worker_class == "gthread" else "")
                 + ", DEBUG=0, settings benchmarks.load.settings"),
        "upstream": f"benchmarks/load/upstream.py, asyncio, {args.upstream_latency_ms:g} ms added latency",
        "targets": {"p95_ms": P95_TARGET_MS, "error_rate": ERROR_RATE_TARGET, "rps": RATE_TARGET,
                    "middleware_cost": MIDDLEWARE_COST_TARGET},
        "rate_limits_on": RATE_LIMITS_ON,
        "durations": durations.__dict__,
    }, "runs": []}
    try:
        stack.start_upstream()
        stack.prepare_database()
        stack.start_site("on", RATE_LIMITS_ON)
        stack.start_site("off", RATE_LIMITS_OFF)
        if args.serve:
            serve(stack)
            return 0
        for number in range(1, args.repeat + 1):
            results["runs"].append(one_run(stack, args, durations, number))
        if args.profile:
            results["profile"] = profile(stack, args, durations, workdir)
    finally:
        stack.close()
        log(f"stopped gunicorn and the upstream; logs in {workdir}")
    if not args.no_write:
        write_results(results)
    for run in results["runs"]:
        held = run["sustainable"]
        cost = run["rate_limit_cost"]
        log(f"run {run['run']}: sustained at saturation {_step(held['saturated'])}; best step {_step(held['best'])}; "
            f"rate-limit cost guarded {_cost(cost['guarded'])}, API {_cost(cost['api'])}")
        if "bare" in run:
            log(f"run {run['run']}: {_bare(run['bare'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
