"""An httpx transport whose every socket operation ends by the guarded attempt's deadline.

httpx bounds each phase (connect, each write, each read), not the request: a
request can take several phases' timeouts in all. This transport's network
streams trim each operation's timeout to the attempt's time left
(``attempt_deadline()``), and refuse to start one once it is gone, so the
http Client can run its attempts in the caller's thread (no hand-off to a
worker thread) and still return by the deadline. What remains of an overrun:
the resolver (``getaddrinfo`` is not bounded by a socket timeout) and the
scheduling of the caller's thread. benchmarks/bench_http_client.py measures the
cost of both ways and the overrun; tests/integrations/test_http_deadline.py tests that it ends.

Outside a guarded attempt the streams behave as httpcore's own.
"""

from __future__ import annotations

from time import monotonic

import httpcore
import httpx

from .resilience.timeouts import attempt_deadline


def _trim(timeout: float | None, expired: type[Exception]) -> float | None:
    deadline = attempt_deadline()
    if deadline is None:
        return timeout
    left = deadline - monotonic()
    if left <= 0:
        raise expired("the guarded attempt's deadline has passed")
    return left if timeout is None or left < timeout else timeout


class DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream
        # what needs no deadline goes straight to the stream (bound here: no wrapper call per use)
        self.close = stream.close
        self.get_extra_info = stream.get_extra_info

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _trim(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:  # h11 ends a message with an empty write: no I/O, nothing to bound
            self._stream.write(buffer, _trim(timeout, httpcore.WriteTimeout))

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                     _trim(timeout, httpcore.ConnectTimeout)))


class DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        return DeadlineStream(self._backend.connect_tcp(host, port, _trim(timeout, httpcore.ConnectTimeout),
                                                        local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options=None) -> httpcore.NetworkStream:
        return DeadlineStream(self._backend.connect_unix_socket(path, _trim(timeout, httpcore.ConnectTimeout),
                                                                socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (same options), its connection pool on a DeadlineBackend."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        pool = self._pool  # httpcore.ConnectionPool, or one of its proxy subclasses
        backend = getattr(pool, "_network_backend", None)
        if not isinstance(backend, httpcore.NetworkBackend):
            raise RuntimeError(f"httpx {httpx.__version__} / httpcore {httpcore.__version__}: the connection pool "
                               f"has no network backend to wrap; the deadline transport does not support this "
                               f"version")
        pool._network_backend = DeadlineBackend(backend)
