"""A simulated upstream: an HTTP server on 127.0.0.1 whose routes fail on purpose.

    upstream = SimulatedUpstream()
    upstream.add_route("/payments", RouteFaults(outages=(Outage(5, 17, every_s=40),)))
    upstream.add_route("/llm", RouteFaults(latency_ms=300, latency_jitter_ms=1200, error_rate=0.1))
    with upstream:                               # start(); stop() on the way out
        httpx.get(upstream.url + "/payments/charge")
        upstream.set_faults("/llm", RouteFaults(error_rate=1.0))   # inject a fault while it runs

Each request goes to the route with the longest matching path prefix, then:

1. outage: inside one of the route's outage windows (seconds since the
   upstream started, repeating every ``every_s`` when set), the answer is
   ``outage_status`` (503), or no answer at all: the connection is closed
   (``outage_status=None``, a network error for the client);
2. latency: ``latency_ms`` plus a uniform draw in [0, ``latency_jitter_ms``];
3. errors: a share ``error_rate`` of requests is answered ``error_status``;
4. otherwise the route's responder answers (200 and JSON by default).

The server only ever listens on 127.0.0.1. ``stop()`` wakes requests that
are sleeping out their latency, joins every thread and closes the socket.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from .serving import bind, serve_in_thread, shut_down

HOST = "127.0.0.1"
DROPPED = "dropped"  # the key counting connections closed without an answer

# responder(method, path, body) -> (status, JSON-ready body)
Responder = Callable[[str, str, object], tuple[int, object]]


@dataclass(frozen=True)
class Outage:
    """The route is down from ``start_s`` to ``end_s`` seconds after the upstream started,
    and again every ``every_s`` seconds when set."""

    start_s: float
    end_s: float
    every_s: float | None = None

    def __post_init__(self):
        if not 0 <= self.start_s < self.end_s:
            raise ValueError(f"an outage needs 0 <= start_s < end_s, got {self.start_s} and {self.end_s}")
        if self.every_s is not None and self.end_s > self.every_s:
            raise ValueError(f"an outage repeating every {self.every_s} s cannot end at {self.end_s} s")

    def active(self, elapsed_s: float) -> bool:
        if self.every_s is not None:
            elapsed_s %= self.every_s
        return self.start_s <= elapsed_s < self.end_s


@dataclass(frozen=True)
class RouteFaults:
    """What goes wrong on one route."""

    error_rate: float = 0.0  # share of requests answered with error_status, in [0, 1]
    error_status: int = 500
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    outages: tuple[Outage, ...] = ()
    outage_status: int | None = 503  # None: the connection is closed without an answer

    def __post_init__(self):
        if not 0 <= self.error_rate <= 1:
            raise ValueError(f"error_rate is a share of requests in [0, 1], got {self.error_rate}")
        for name in ("error_status", "outage_status"):
            status = getattr(self, name)
            if status is not None and not 100 <= status <= 599:
                raise ValueError(f"{name} must be an HTTP status (100-599), got {status}")
        if self.latency_ms < 0 or self.latency_jitter_ms < 0:
            raise ValueError("latency_ms and latency_jitter_ms must be 0 or more")

    def outage(self, elapsed_s: float) -> bool:
        return any(window.active(elapsed_s) for window in self.outages)


def echo(method: str, path: str, body: object) -> tuple[int, object]:
    """The default responder: says what it received."""
    return 200, {"ok": True, "method": method, "path": path, "received": body}


@dataclass
class _Route:
    faults: RouteFaults
    respond: Responder
    answers: dict = field(default_factory=dict)  # status (or DROPPED) -> count


class SimulatedUpstream:
    def __init__(self, port: int = 0, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.port = port  # 0: a free port, chosen at start()
        self.clock = clock
        self.rng = rng or random.Random()
        self._routes: dict[str, _Route] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._in_flight = 0
        self.started_at: float | None = None

    # -- routes and faults ----------------------------------------------------

    def add_route(self, prefix: str, faults: RouteFaults | None = None, respond: Responder = echo) -> None:
        if not prefix.startswith("/"):
            raise ValueError(f"a route prefix starts with '/', got {prefix!r}")
        with self._lock:
            self._routes[prefix] = _Route(faults or RouteFaults(), respond)

    def set_faults(self, prefix: str, faults: RouteFaults) -> None:
        """Replace a route's faults now (requests already sleeping keep theirs)."""
        with self._lock:
            if prefix not in self._routes:
                raise KeyError(f"no route {prefix!r}; routes: {', '.join(sorted(self._routes)) or 'none'}")
            self._routes[prefix].faults = faults

    def answers(self) -> dict[str, dict]:
        """Per route, how many requests got each status (or were dropped)."""
        with self._lock:
            return {prefix: dict(route.answers) for prefix, route in self._routes.items()}

    def in_flight(self) -> int:
        """Requests being answered now (sleeping out their latency included)."""
        with self._lock:
            return self._in_flight

    def elapsed_s(self) -> float:
        return 0.0 if self.started_at is None else self.clock() - self.started_at

    # -- lifecycle ----------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the upstream is not running: call start() first")
        return f"http://{HOST}:{self.port}"

    def start(self) -> SimulatedUpstream:
        if self._server is not None:
            raise RuntimeError("the upstream is already running")
        server = bind(_Server, _Handler, HOST, self.port, "the simulated upstream")
        server.upstream = self
        self._server = server
        self.port = server.server_address[1]
        self._stopping.clear()
        self.started_at = self.clock()
        self._thread = serve_in_thread(server, f"demo-upstream-{self.port}", poll_interval=0.1)
        return self

    def stop(self) -> None:
        """Stop accepting, wake sleeping requests, join every thread and close the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        shut_down(server, self._thread)  # the request threads joined too (block_on_close)

    def __enter__(self) -> SimulatedUpstream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- one request ------------------------------------------------------------

    def _route_for(self, path: str) -> tuple[str, _Route] | tuple[None, None]:
        with self._lock:
            matches = [prefix for prefix in self._routes if path == prefix or path.startswith(prefix.rstrip("/") + "/")]
            if not matches:
                return None, None
            prefix = max(matches, key=len)
            return prefix, self._routes[prefix]

    def _count(self, route: _Route, answer) -> None:
        with self._lock:
            route.answers[answer] = route.answers.get(answer, 0) + 1

    def answer(self, method: str, path: str, body: object) -> tuple[int | None, object]:
        """The status (None: drop the connection) and body for one request, after its latency."""
        with self._lock:
            self._in_flight += 1
        try:
            return self._answer(method, path, body)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(self, method: str, path: str, body: object) -> tuple[int | None, object]:
        prefix, route = self._route_for(path)
        if route is None:
            return 404, {"error": f"no route for {path}"}
        faults = route.faults
        if faults.outage(self.elapsed_s()):
            status, reply = faults.outage_status, {"error": f"{prefix} is down (scheduled outage)"}
        else:
            delay_ms = faults.latency_ms + (self.rng.uniform(0, faults.latency_jitter_ms)
                                            if faults.latency_jitter_ms else 0.0)
            if delay_ms and self._stopping.wait(delay_ms / 1000):
                status, reply = 503, {"error": "the upstream is shutting down"}
            elif faults.error_rate and self.rng.random() < faults.error_rate:
                status, reply = faults.error_status, {"error": f"injected error on {prefix}"}
            else:
                status, reply = route.respond(method, path, body)
        self._count(route, DROPPED if status is None else status)
        return status, reply


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # request threads are joined by server_close()
    block_on_close = True
    allow_reuse_address = True
    upstream: SimulatedUpstream


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that sends nothing does not hold a thread forever

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        path = self.path.split("?", 1)[0]
        status, reply = self.server.upstream.answer(self.command, path, body)
        if status is None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        data = json.dumps(reply).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client stopped waiting (its timeout): nobody to answer

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, format, *args) -> None:
        """Silent: the demo's console shows what the integrations saw, not every request."""
