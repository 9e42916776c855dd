"""The http Client's deadline transport (integrations/http_deadline.py): attempts in the caller's thread that
still end by their deadline, against the real server of tests/http_support.py."""

import threading
import time

import httpx
import pytest

from http_support import SLOW_S, http_server, integration, upstream  # noqa: F401 - fixtures
from integrations.errors import ErrorCategory, ResilienceError
from integrations.http import Client
from integrations.http_deadline import DeadlineTransport

pytestmark = pytest.mark.django_db
# how far past its deadline a caller may be let go: the thread's scheduling on a loaded machine, not a phase
OVERRUN_S = 0.4


def threads_of(http):
    seen = []
    http.event_hooks["request"].append(lambda request: seen.append(threading.current_thread()))
    return seen


@pytest.mark.parametrize("enforcement", ["thread", "inline"])
def test_attempts_run_in_the_callers_thread_whatever_the_enforcement(upstream, enforcement):
    integration(timeout_enforcement=enforcement)
    with Client("upstream", base_url=upstream.url) as http:
        seen = threads_of(http)
        assert http.get("/ok").json() == {"hits": 1}
    assert seen == [threading.current_thread()]


@pytest.mark.parametrize("path", ["/trickle", "/slow"])
def test_a_trickling_or_silent_upstream_is_cut_at_the_attempts_deadline(upstream, path):
    # each read would be let wait 2 s (the attempt's timeout as httpx applies it, per read): the
    # transport trims every read to the attempt's time left instead
    integration(max_retries=0, attempt_timeout_ms=500, timeout_ms=2_000, read_timeout_ms=500)
    started = time.monotonic()
    with Client("upstream", base_url=upstream.url) as http:
        seen = threads_of(http)
        with pytest.raises(ResilienceError) as caught:
            http.get(path)
    elapsed = time.monotonic() - started
    assert caught.value.category is ErrorCategory.TIMEOUT
    assert elapsed < 0.5 + OVERRUN_S and seen == [threading.current_thread()]


@pytest.mark.parametrize("transport, bound_s", [(None, 1.0 + OVERRUN_S), ("httpx", 1.5)])
def test_a_read_started_late_gets_only_the_time_left(upstream, transport, bound_s):
    # headers at 0.9 s of a 1 s attempt, then silence: httpx's own transport gives the next read the
    # whole 1 s read timeout it was set at the start (the call ends near 1.9 s); the deadline
    # transport gives it the 0.1 s left
    integration(max_retries=0, attempt_timeout_ms=1_000, timeout_ms=5_000, timeout_enforcement="inline")
    options = {} if transport is None else {"transport": httpx.HTTPTransport()}
    started = time.monotonic()
    with Client("upstream", base_url=upstream.url, **options) as http, pytest.raises(ResilienceError) as caught:
        http.get("/late-then-silent")
    elapsed = time.monotonic() - started
    assert caught.value.category is ErrorCategory.TIMEOUT
    if transport is None:
        assert elapsed < bound_s
    else:
        assert elapsed > bound_s  # what the deadline transport saves: the test would pass without it otherwise


def test_every_attempt_of_a_retried_call_keeps_its_own_deadline_and_the_call_its_own(upstream):
    integration(max_retries=3, attempt_timeout_ms=300, timeout_ms=1_000, base_delay_ms=1, max_delay_ms=1,
                jitter=False)
    started = time.monotonic()
    with Client("upstream", base_url=upstream.url) as http, pytest.raises(ResilienceError):
        http.get("/trickle")
    assert time.monotonic() - started < 1.0 + OVERRUN_S  # the overall timeout, with up to 4 attempts
    assert 2 <= upstream.hits("/trickle") <= 4


def test_a_transport_of_the_callers_own_runs_as_the_integrations_enforcement_says(upstream):
    integration(timeout_enforcement="thread", max_retries=0, attempt_timeout_ms=300, timeout_ms=1_000)
    with Client("upstream", base_url=upstream.url, transport=httpx.HTTPTransport()) as http:
        seen = threads_of(http)
        assert http.get("/ok").status_code == 200
        started = time.monotonic()
        with pytest.raises(ResilienceError) as caught:
            http.get("/slow")
    assert seen[0] is not threading.current_thread()  # handed to the integration's worker thread
    assert caught.value.category is ErrorCategory.TIMEOUT and time.monotonic() - started < SLOW_S - 0.5


def test_outside_a_guarded_attempt_the_transport_is_httpxs_own(upstream):
    with httpx.Client(base_url=upstream.url, transport=DeadlineTransport()) as http:
        assert http.get("/ok").json() == {"hits": 1}
    with httpx.Client(base_url=upstream.url, transport=DeadlineTransport(), timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.get("/slow")  # httpx's own timeout applies as usual


class _Recording:
    """A network stream that records what reaches it (the real socket's part is not the point here)."""

    def __init__(self) -> None:
        self.writes: list[tuple[bytes, float | None]] = []
        self.closed = False

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.writes.append((buffer, timeout))

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, info: str):
        return f"info:{info}"


def test_a_stream_write_is_trimmed_refused_past_the_deadline_and_an_empty_one_skipped():
    import httpcore

    from integrations.http_deadline import DeadlineStream
    from integrations.resilience.timeouts import _attempt_deadline as ATTEMPT_DEADLINE

    inner = _Recording()
    stream = DeadlineStream(inner)
    token = ATTEMPT_DEADLINE.set(time.monotonic() + 0.5)
    try:
        stream.write(b"GET / HTTP/1.1\r\n\r\n", timeout=5.0)
        stream.write(b"", timeout=5.0)  # h11's end of message: no I/O
    finally:
        ATTEMPT_DEADLINE.reset(token)
    assert len(inner.writes) == 1 and 0 < inner.writes[0][1] <= 0.5  # the 5 s cut to the time left
    token = ATTEMPT_DEADLINE.set(time.monotonic() - 0.01)
    try:
        with pytest.raises(httpcore.WriteTimeout):
            stream.write(b"late", timeout=5.0)
    finally:
        ATTEMPT_DEADLINE.reset(token)
    assert len(inner.writes) == 1
    assert stream.get_extra_info("socket") == "info:socket"
    stream.close()
    assert inner.closed
