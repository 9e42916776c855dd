"""The fault-injecting proxy itself (tests/chaos/proxy.py): each fault does what it says, on a real upstream."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from chaos_support import upstream  # noqa: F401 - a fixture
from proxy import FaultProxy

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(60)]


@pytest.fixture
def proxy(upstream):
    server = FaultProxy(upstream.port).start()
    yield server
    server.stop()


def get(proxy, path, timeout=5.0):
    started = time.monotonic()
    response = httpx.get(f"http://127.0.0.1:{proxy.port}{path}", timeout=timeout)
    return response, time.monotonic() - started


def test_without_faults_it_forwards_every_byte_both_ways(proxy):
    response, _ = get(proxy, "/bytes?n=200000")
    assert response.status_code == 200 and response.content == b"x" * 200000
    assert proxy.stats["forwarded"] == 1


def test_latency_delays_the_answer(proxy):
    proxy.set(latency_s=0.3)
    response, took = get(proxy, "/ok")
    assert response.status_code == 200
    assert took >= 0.3


def test_a_bandwidth_limit_trickles_the_answer_in_slices(proxy):
    proxy.set(bandwidth_bps=20_000, slice_bytes=500)
    response, took = get(proxy, "/bytes?n=10000")
    assert response.content == b"x" * 10000
    assert took >= 0.45  # 10 kB at 20 kB/s


def test_reset_resets_new_connections(proxy):
    proxy.set(reset=True)
    with pytest.raises(httpx.TransportError):
        get(proxy, "/ok")
    assert proxy.stats["reset"] >= 1


def test_reset_after_bytes_cuts_the_answer_short(proxy):
    proxy.set(reset_after_bytes=100)
    with pytest.raises(httpx.TransportError):
        get(proxy, "/bytes?n=100000")
    assert proxy.stats["reset_mid_stream"] == 1


def test_a_blackhole_accepts_and_never_answers(proxy):
    proxy.set(blackhole=True)
    with pytest.raises(httpx.ReadTimeout):
        get(proxy, "/ok", timeout=0.3)
    assert proxy.stats["blackholed"] == 1


def test_clear_brings_the_pass_through_back(proxy):
    proxy.set(blackhole=True)
    proxy.clear()
    response, _ = get(proxy, "/ok")
    assert response.status_code == 200


def test_stop_closes_the_listener_and_the_connections_it_holds(upstream):
    proxy = FaultProxy(upstream.port).start()
    proxy.set(blackhole=True)
    held = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    time.sleep(0.1)
    proxy.stop()
    held.settimeout(2)
    try:
        assert held.recv(1) == b""  # closed by the proxy (a FIN)...
    except ConnectionResetError:
        pass  # ...or an RST
    finally:
        held.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
