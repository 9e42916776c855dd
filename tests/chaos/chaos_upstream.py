"""A scripted HTTP upstream for the chaos scenarios, in a process of its own, on 127.0.0.1.

    python tests/chaos/chaos_upstream.py [--flap-s 0.6]    # prints "PORT <n>", then serves

Paths:

    /ok           200, a small JSON body
    /fail         503 (any method)
    /flap         alternating windows of --flap-s seconds from start-up: 200 in
                  even windows, 503 in odd ones (a flapping upstream)
    /bytes?n=N    200 with an N-byte body
    /stats        what it served: {"requests": {path: n}, "flap": {"healthy": n, "failing": n}}
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

STARTED = time.monotonic()
FLAP_S = 0.6
LOCK = threading.Lock()
REQUESTS: collections.Counter = collections.Counter()
FLAP: collections.Counter = collections.Counter()


def flap_healthy(now: float) -> bool:
    return int((now - STARTED) / FLAP_S) % 2 == 0


class Handler(BaseHTTPRequestHandler):
    def _respond(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        url = urlsplit(self.path)
        path = url.path
        with LOCK:
            REQUESTS[path] += 1
        if path == "/ok":
            self._send(200, json.dumps({"ok": True}).encode())
        elif path == "/fail":
            self._send(503, b'{"error": "unavailable"}')
        elif path == "/flap":
            healthy = flap_healthy(time.monotonic())
            with LOCK:
                FLAP["healthy" if healthy else "failing"] += 1
            self._send(200, b'{"ok": true}') if healthy else self._send(503, b'{"error": "flapping"}')
        elif path == "/bytes":
            size = int(parse_qs(url.query).get("n", ["1024"])[0])
            self._send(200, b"x" * size, "application/octet-stream")
        elif path == "/stats":
            with LOCK:
                body = {"requests": dict(REQUESTS), "flap": dict(FLAP)}
            self._send(200, json.dumps(body).encode())
        else:
            self._send(404, b'{"error": "unscripted path"}')

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the caller gave up (its timeout): nothing to answer

    do_GET = do_POST = do_HEAD = _respond

    def log_message(self, format, *args) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def main() -> None:
    global FLAP_S, STARTED
    parser = argparse.ArgumentParser()
    parser.add_argument("--flap-s", type=float, default=FLAP_S)
    FLAP_S = parser.parse_args().flap_s
    server = Server(("127.0.0.1", 0), Handler)
    STARTED = time.monotonic()
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
