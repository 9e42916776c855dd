"""A small, fast HTTP/1.1 upstream for the load benchmark: asyncio, keep-alive, 200 and a small JSON.

    python benchmarks/load/upstream.py [--port 0] [--latency-ms 0]   # prints "PORT <n>", then serves

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
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

HOST = "127.0.0.1"
HEADER_END = b"\r\n\r\n"
MAX_HEADER_BYTES = 64 * 1024


class Upstream:
    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.served = 0

    def body(self, path: bytes) -> bytes:
        if path == b"/__stats":
            return json.dumps({"served": self.served}).encode()
        self.served += 1
        return b'{"ok": true, "n": %d}' % self.served


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
        if self.upstream.latency_s > 0:
            self.queue = asyncio.Queue()
            self.writer_task = asyncio.get_running_loop().create_task(self._answer_after_latency())

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
            path = request_line[1].split(b"?", 1)[0] if len(request_line) > 1 else b"/"
            close = b"\r\nconnection: close" in head.lower()
            if path == b"/__hang":
                continue
            if path == b"/__trickle":
                asyncio.get_running_loop().create_task(self._trickle())
                continue
            if self.queue is None:
                self._answer(path, close)
            else:
                self.queue.put_nowait((path, close))

    async def _trickle(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
        while not self.transport.is_closing():
            self.transport.write(b" ")
            await asyncio.sleep(0.05)

    async def _answer_after_latency(self) -> None:
        while True:
            path, close = await self.queue.get()
            await asyncio.sleep(self.upstream.latency_s)
            if self.transport.is_closing():
                return
            self._answer(path, close)

    def _answer(self, path: bytes, close: bool) -> None:
        body = self.upstream.body(path)
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), b"Connection: close\r\n" if close else b"", body))
        if close:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.writer_task is not None:
            self.writer_task.cancel()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return int(value.strip())
            except ValueError:
                return 0
    return 0


async def serve(port: int, latency_ms: float) -> None:
    upstream = Upstream(latency_ms / 1000)
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
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.latency_ms))


if __name__ == "__main__":
    sys.exit(main())
