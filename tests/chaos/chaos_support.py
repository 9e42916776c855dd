"""What the chaos scenarios share: servers of the test's own, bounded waits, the measured row.

Every server a scenario starts (redis-server, PostgreSQL, the scripted
upstream, a django-q cluster) listens on 127.0.0.1 only, on a port of its
own, and is stopped by the fixture that started it, also when the test fails.
Each scenario writes its measured row to artifacts/chaos/<scenario>.json
(and prints it): RELIABILITY.md quotes those rows.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

CHAOS_DIR = Path(__file__).resolve().parent
ROOT = CHAOS_DIR.parent.parent
ARTIFACTS = ROOT / "artifacts" / "chaos"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, what: str, timeout_s: float = 30.0, interval_s: float = 0.05, log: Path | None = None):
    """Poll ``predicate`` until it returns something truthy; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"{what}: not within {timeout_s} s\n{tail}")
        time.sleep(interval_s)


def stop_group(process: subprocess.Popen | None, grace_s: float = 5.0) -> None:
    """SIGTERM a process started with start_new_session=True, then SIGKILL whatever is left of its group."""
    if process is None:
        return
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def child_env(**extra) -> dict:
    """The environment of a Python process a scenario starts: this checkout, tests/ and tests/chaos importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHAOS_DIR), str(CHAOS_DIR.parent), str(ROOT),
                                                      env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["DJANGO_SETTINGS_MODULE"] = "resilience_site.settings"
    env.update({key: str(value) for key, value in extra.items()})
    return env


def record(scenario: str, **row) -> dict:
    """Print the scenario's measured row and write it to artifacts/chaos/<scenario>.json."""
    row = {"scenario": scenario, **row, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{scenario}.json").write_text(json.dumps(row, indent=2, sort_keys=False) + "\n")
    print(f"\nCHAOS ROW {json.dumps(row)}")
    return row


def percentile(values, share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(int(share * len(ordered)), len(ordered) - 1)]


# -- redis-server ---------------------------------------------------------------------


class OwnRedis:
    """A redis-server of the test's own, on its own port, without persistence: the test may kill it."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it; returns the monotonic time at which it first answered PING."""
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.2)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    client.ping()
                    return time.monotonic()
                except redis.exceptions.ConnectionError:
                    time.sleep(0.01)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the clients."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        stop_group(self.process, grace_s=0)


# -- PostgreSQL -----------------------------------------------------------------------


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = Path(found[-1]) if found else (Path(shutil.which("initdb")) if shutil.which("initdb") else None)
    if initdb is None:
        pytest.fail("PostgreSQL's initdb is not installed (Debian: postgresql)")
    return initdb.parent


class OwnPostgres:
    """A PostgreSQL cluster of the test's own: initdb in a temporary directory, its own port, trust auth.

    Nothing here touches the machine's main cluster. initdb refuses to run as
    root, so as root the server runs as the ``postgres`` user (runuser).
    """

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="chaos-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root and there is no postgres user to run PostgreSQL as")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                        f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")

    def url(self, database: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*self.as_user, str(self.bin / args[0]), *args[1:]], check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _ctl(self, action: str, *args: str) -> None:
        self._run("pg_ctl", action, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", *args)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def start(self) -> float:
        """Start the server; returns the monotonic time at which it accepts connections."""
        self._ctl("start", "-o", self.options)
        return time.monotonic()

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-m", mode)

    def restart(self) -> float:
        """``pg_ctl restart -m fast``: every connection is terminated; returns when it accepts connections again."""
        self._ctl("restart", "-m", "fast", "-o", self.options)
        return time.monotonic()

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the scripted upstream ----------------------------------------------------------------


class Upstream:
    """tests/chaos/chaos_upstream.py in a process of its own (see its docstring for the paths)."""

    def __init__(self, flap_s: float = 0.6) -> None:
        self.flap_s = flap_s
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Upstream:
        self.process = subprocess.Popen(
            [sys.executable, str(CHAOS_DIR / "chaos_upstream.py"), "--flap-s", str(self.flap_s)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(), start_new_session=True)
        line = self.process.stdout.readline().decode().strip()
        if not line.startswith("PORT "):
            stop_group(self.process)
            raise RuntimeError(f"the upstream did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/stats", timeout=5).json()

    def stop(self) -> None:
        stop_group(self.process, grace_s=2)


@pytest.fixture
def upstream():
    server = Upstream()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def own_redis():
    server = OwnRedis()
    try:
        server.start()
        yield server
    finally:
        server.stop()
