"""A fault-injecting TCP proxy for the chaos tests (toxiproxy is not available here).

    proxy = FaultProxy(upstream_port).start()     # listens on 127.0.0.1, an ephemeral port
    url = f"http://127.0.0.1:{proxy.port}"
    proxy.set(latency_s=0.5)                      # each chunk towards the client waits 0.5 s
    proxy.set(bandwidth_bps=4096)                 # ...and trickles at 4 KiB/s, in slices
    proxy.set(reset=True)                         # new connections are reset (RST) on arrival
    proxy.set(reset_after_bytes=100)              # ...or once 100 bytes went to the client
    proxy.set(blackhole=True)                     # new connections are accepted, read, never answered
    proxy.clear()                                 # a plain pass-through again
    proxy.stop()                                  # closes the listener and every connection

An asyncio server in a thread of its own. Faults are a frozen ``Faults``
value swapped whole, so a change is seen at once by the next connection
(reset, blackhole) or the next chunk (latency, bandwidth). Only 127.0.0.1 is
used, on both sides. ``stats`` counts connections by what was done to them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import socket
import struct
import threading


@dataclasses.dataclass(frozen=True)
class Faults:
    latency_s: float = 0.0  # added before each chunk forwarded to the client
    bandwidth_bps: int = 0  # bytes per second towards the client (0: unlimited), sent in slices
    slice_bytes: int = 256  # the slice size under a bandwidth limit
    reset: bool = False  # reset new connections at once
    reset_after_bytes: int = 0  # reset once this many bytes went to the client (0: never)
    blackhole: bool = False  # accept new connections and never answer

    def describe(self) -> str:
        changed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default and f.name != "slice_bytes"}
        return ", ".join(f"{k}={v}" for k, v in changed.items()) or "none"


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = Faults()
        self.port = 0
        self.stats: collections.Counter = collections.Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # -- the test's side -------------------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10) or not self.port:
            raise RuntimeError("the fault proxy did not start")
        return self

    def set(self, **faults) -> Faults:
        self.faults = Faults(**faults)
        return self.faults

    def clear(self) -> None:
        self.faults = Faults()

    def stop(self) -> None:
        if self._loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        future.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    # -- the proxy's thread --------------------------------------------------------

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def listen():
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=256)
            self.port = self._server.sockets[0].getsockname()[1]

        self._loop.run_until_complete(listen())
        ready.set()
        self._loop.run_forever()

    async def _shutdown(self) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._writers.add(writer)
        faults = self.faults  # what a connection meets is decided when it arrives
        try:
            if faults.reset:
                self.stats["reset"] += 1
                _reset(writer)
                return
            if faults.blackhole:
                self.stats["blackholed"] += 1
                while await reader.read(65536):
                    pass  # swallow whatever comes; answer nothing, ever
                return
            self.stats["forwarded"] += 1
            await self._forward(reader, writer)
        except (ConnectionError, asyncio.CancelledError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()

    async def _forward(self, client_reader, client_writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        self._writers.add(upstream_writer)
        towards_upstream = asyncio.ensure_future(self._pipe(client_reader, upstream_writer))
        towards_client = asyncio.ensure_future(self._to_client(upstream_reader, client_writer))
        try:
            await asyncio.wait({towards_upstream, towards_client}, return_when=asyncio.FIRST_COMPLETED)
            await towards_client  # the request may be sent and the client gone: the answer still comes back
        finally:
            for task in (towards_upstream, towards_client):
                task.cancel()
            await asyncio.gather(towards_upstream, towards_client, return_exceptions=True)
            self._writers.discard(upstream_writer)
            upstream_writer.close()

    @staticmethod
    async def _pipe(reader, writer) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def _to_client(self, upstream_reader, client_writer) -> None:
        sent = 0
        while data := await upstream_reader.read(65536):
            faults = self.faults
            if faults.latency_s:
                await asyncio.sleep(faults.latency_s)
            if faults.reset_after_bytes and sent + len(data) >= faults.reset_after_bytes:
                client_writer.write(data[:max(faults.reset_after_bytes - sent, 0)])
                self.stats["reset_mid_stream"] += 1
                _reset(client_writer)
                return
            step = max(faults.slice_bytes, 1) if faults.bandwidth_bps else len(data)
            for start in range(0, len(data), step):
                piece = data[start:start + step]
                client_writer.write(piece)
                await client_writer.drain()
                if faults.bandwidth_bps:
                    await asyncio.sleep(len(piece) / faults.bandwidth_bps)
            sent += len(data)
        client_writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN: SO_LINGER on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
