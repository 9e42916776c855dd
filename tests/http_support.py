"""A real HTTP server on 127.0.0.1 scripted per path, for the http clients' tests (sync and async).

Each path keeps a count of the requests it received (and when), so a test can
tell how many attempts reached it.
"""

import collections
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from integrations.models import Integration

SLOW_S = 3.0


class ScriptedUpstream:
    """What the handler answers, by path and by how many requests that path has seen."""

    def __init__(self):
        self.lock = threading.Lock()
        self.arrivals = collections.defaultdict(list)

    def reset(self):
        with self.lock:
            self.arrivals.clear()

    def arrive(self, path):
        with self.lock:
            self.arrivals[path].append(time.monotonic())
            return len(self.arrivals[path])

    def hits(self, path):
        with self.lock:
            return len(self.arrivals[path])

    def answer(self, path, n):
        """(status, headers, body) for the n-th request (1-based) to ``path``."""
        if path == "/ok":
            return 200, {}, {"hits": n}
        if path == "/flaky":
            return (503, {}, {"error": "unavailable"}) if n <= 2 else (200, {}, {"hits": n})
        if path == "/always500":
            return 500, {}, {"error": "boom"}
        if path == "/429":
            return (429, {"Retry-After": "0"}, {"error": "slow down"}) if n == 1 else (200, {}, {"hits": n})
        if path == "/always429":
            return 429, {"Retry-After": "0"}, {"error": "slow down"}
        if path == "/429-wait-1s":
            return (429, {"Retry-After": "1"}, {"error": "slow down"}) if n == 1 else (200, {}, {"hits": n})
        if path == "/429-wait-1h":
            return (429, {"Retry-After": "3600"}, {"error": "slow down"}) if n == 1 else (200, {}, {"hits": n})
        if path == "/404":
            return 404, {}, {"error": "no such thing"}
        if path == "/up-then-down":
            return (200, {}, {"hits": n}) if n == 1 else (500, {}, {"error": "down"})
        if path == "/slow":
            time.sleep(SLOW_S)
            return 200, {}, {"hits": n}
        if path == "/slow-first":  # a slow replica first, a fast one after: what a hedge is for
            if n == 1:
                time.sleep(1.0)
            return 200, {}, {"hits": n}
        return 404, {}, {"error": f"unscripted path {path}"}


SCRIPT = ScriptedUpstream()


class Handler(BaseHTTPRequestHandler):
    def _respond(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        n = SCRIPT.arrive(self.path)
        if self.path == "/trickle":
            return self._trickle()
        if self.path == "/late-then-silent":
            return self._late_then_silent()
        status, headers, body = SCRIPT.answer(self.path, n)
        payload = json.dumps(body).encode()
        try:
            self.send_response(status)
            for header, value in headers.items():
                self.send_header(header, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer

    def _trickle(self):
        """Headers at once, then the 30-byte body one byte every 100 ms (3 s in all)."""
        try:
            self.send_response(200)
            self.send_header("Content-Length", "30")
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up at its deadline: nothing more to send

    def _late_then_silent(self):
        """Headers after 0.9 s, then nothing for 3 s: a read started late must not get a whole read timeout."""
        try:
            time.sleep(0.9)
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.flush()
            time.sleep(3)
            self.wfile.write(b"x" * 10)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up at its deadline

    do_GET = do_POST = do_HEAD = do_PUT = do_PATCH = do_DELETE = _respond

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def upstream(http_server):
    SCRIPT.reset()
    SCRIPT.url = http_server
    return SCRIPT


@pytest.fixture
def closed_port():
    """A port nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def integration(name="upstream", **knobs):
    """An external_api integration with delays small enough that retries do not slow the suite."""
    knobs = {"kind": "external_api", "base_delay_ms": 1, "max_delay_ms": 5, "jitter": False, **knobs}
    return Integration.objects.create(name=name, **knobs)
