"""A small, fast HTTP/1.1 upstream for the load benchmark: asyncio, keep-alive, 200 and a small JSON.

    python benchmarks/load/upstream.py [--port 0] [--latency-ms 0] [--fail-rate 0]
                                       [--spike-rate 0 --spike-ms 0]   # prints "PORT <n>", then serves

Every request, whatever its method and path, is answered 200 with
``{"ok": true, "n": <request number>}``, after ``--latency-ms`` when given
(an ``asyncio.sleep``: the server keeps answering others meanwhile). It listens
on 127.0.0.1 only. One asyncio protocol object per connection parses the
requests itself (no per-request framework work), so on one core it answers
several thousand requests a second: a benchmark of the site must not measure
its upstream. GET /__stats answers how many requests were served. Two paths
misbehave on purpose, for the http client benchmark's overrun rows: /__hang
never answers; /__trickle sends its headers and then one byte of its body
every 50 ms, never finishing (each read gets data well within any read
timeout, so only a deadline on the whole attempt ends it).

Faults, for the stress scenario: ``--fail-rate`` is the share of requests
answered 503 (a JSON error) instead of 200; ``--spike-rate`` the share
answered only after ``--spike-ms`` more (a latency spike; later answers on
that connection wait behind it, as HTTP/1.1 requires). GET
/__fault?fail_rate=0.3&spike_rate=0.02&spike_ms=1500 changes them while it
runs (a parameter left out is kept) and answers the faults now in force;
neither control path is counted as served. Draws come from a seeded random
generator, so a run's faults are reproducible.
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import urllib.parse

HOST = "127.0.0.1"
HEADER_END = b"\r\n\r\n"
MAX_HEADER_BYTES = 64 * 1024


FAULTS = ("fail_rate", "spike_rate", "spike_ms")


class Upstream:
    def __init__(self, latency_s: float, fail_rate: float = 0.0, spike_rate: float = 0.0,
                 spike_ms: float = 0.0) -> None:
        self.latency_s = latency_s
        self.faults = {"fail_rate": fail_rate, "spike_rate": spike_rate, "spike_ms": spike_ms}
        self.random = random.Random(7)
        self.served = 0
        self.failed = 0
        self.spiked = 0

    def answer(self, path: bytes, query: bytes) -> tuple[int, bytes, float]:
        """(status, body, delay in seconds) for one request."""
        if path == b"/__stats":
            return 200, json.dumps({"served": self.served, "failed": self.failed, "spiked": self.spiked}).encode(), 0.0
        if path == b"/__fault":
            return self.set_faults(query)
        delay = self.latency_s
        if self.faults["spike_rate"] and self.random.random() < self.faults["spike_rate"]:
            self.spiked += 1
            delay += self.faults["spike_ms"] / 1000
        if self.faults["fail_rate"] and self.random.random() < self.faults["fail_rate"]:
            self.failed += 1
            return 503, b'{"ok": false, "error": "injected"}', delay
        self.served += 1
        return 200, b'{"ok": true, "n": %d}' % self.served, delay

    def set_faults(self, query: bytes) -> tuple[int, bytes, float]:
        given = urllib.parse.parse_qs(query.decode("latin-1"))
        unknown = sorted(set(given) - set(FAULTS))
        try:
            values = {name: float(given[name][-1]) for name in FAULTS if name in given}
        except ValueError as error:
            return 400, json.dumps({"error": str(error)}).encode(), 0.0
        bad = [name for name, value in values.items() if value < 0 or (name != "spike_ms" and value > 1)]
        if unknown or bad:
            return 400, json.dumps({"error": f"unknown {unknown}, out of range {bad}"}).encode(), 0.0
        self.faults.update(values)
        return 200, json.dumps(self.faults).encode(), 0.0


class UpstreamProtocol(asyncio.Protocol):
    """Reads pipelined or sequential requests from one connection and answers them in order."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue | None = None
        self.writer_task: asyncio.Task | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(HEADER_END)
            if end < 0:
                if len(self.buffer) > MAX_HEADER_BYTES:
                    self.transport.close()
                return
            head = self.buffer[:end]
            length = _content_length(head)
            total = end + len(HEADER_END) + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            request_line = head.split(b"\r\n", 1)[0].split(b" ")
            path, _, query = (request_line[1] if len(request_line) > 1 else b"/").partition(b"?")
            close = b"\r\nconnection: close" in head.lower()
            if path == b"/__hang":
                continue
            if path == b"/__trickle":
                asyncio.get_running_loop().create_task(self._trickle())
                continue
            status, body, delay = self.upstream.answer(path, query)
            if delay > 0 and self.queue is None:
                # From the first delayed answer on, this connection's answers go out in order through a queue.
                self.queue = asyncio.Queue()
                self.writer_task = asyncio.get_running_loop().create_task(self._answer_in_order())
            if self.queue is None:
                self._answer(status, body, close)
            else:
                self.queue.put_nowait((status, body, delay, close))

    async def _trickle(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
        while not self.transport.is_closing():
            self.transport.write(b" ")
            await asyncio.sleep(0.05)

    async def _answer_in_order(self) -> None:
        while True:
            status, body, delay, close = await self.queue.get()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.transport.is_closing():
                return
            self._answer(status, body, close)

    def _answer(self, status: int, body: bytes, close: bool) -> None:
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, REASONS[status], len(body), b"Connection: close\r\n" if close else b"", body))
        if close:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.writer_task is not None:
            self.writer_task.cancel()


REASONS = {200: b"OK", 400: b"Bad Request", 503: b"Service Unavailable"}


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return int(value.strip())
            except ValueError:
                return 0
    return 0


async def serve(port: int, latency_ms: float, fail_rate: float = 0.0, spike_rate: float = 0.0,
                spike_ms: float = 0.0) -> None:
    upstream = Upstream(latency_ms / 1000, fail_rate, spike_rate, spike_ms)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(upstream), HOST, port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of requests answered 503")
    parser.add_argument("--spike-rate", type=float, default=0.0, help="share of requests answered --spike-ms later")
    parser.add_argument("--spike-ms", type=float, default=0.0, help="a latency spike's added delay")
    args = parser.parse_args(argv)
    for name in ("fail_rate", "spike_rate"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    asyncio.run(serve(args.port, args.latency_ms, args.fail_rate, args.spike_rate, args.spike_ms))


if __name__ == "__main__":
    sys.exit(main())
