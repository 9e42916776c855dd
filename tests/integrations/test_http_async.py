"""integrations.http.AsyncClient: the sync Client's behaviour on httpx.AsyncClient, against the same real
HTTP server (tests/http_support.py); and the per-phase timeouts both clients apply."""

import asyncio
import time

import httpx
import pytest

from http_support import SLOW_S, closed_port, http_server, integration, upstream  # noqa: F401 - fixtures
from integrations.errors import ErrorCategory, ResilienceError
from integrations.http import AsyncClient, Client
from integrations.resilience import Fallback, get_engine

pytestmark = pytest.mark.django_db


def run(upstream, requests, name="upstream", **kwargs):
    """Run ``requests(client)`` (a coroutine function) on an AsyncClient; the policy is loaded first, as a
    site's first sync call would (aexecute loads an unknown one through sync_to_async itself)."""
    get_engine().registry.get(name)

    async def main():
        async with AsyncClient(name, base_url=upstream.url, **kwargs) as http:
            return await requests(http)

    return asyncio.run(main())


def failure(upstream, requests, **kwargs):
    with pytest.raises(ResilienceError) as caught:
        run(upstream, requests, **kwargs)
    return caught.value


def test_it_returns_the_httpx_response_of_a_200(upstream):
    integration()
    response = run(upstream, lambda http: http.get("/ok"))
    assert isinstance(response, httpx.Response) and response.json() == {"hits": 1}


def test_it_retries_a_503_then_returns_the_200_and_a_429_after_its_retry_after(upstream):
    integration()
    assert run(upstream, lambda http: http.get("/flaky")).json() == {"hits": 3}
    assert run(upstream, lambda http: http.get("/429")).json() == {"hits": 2}
    assert upstream.hits("/flaky") == 3 and upstream.hits("/429") == 2


def test_errors_are_classified_as_by_the_sync_client(upstream, closed_port):
    integration(max_retries=1)
    assert failure(upstream, lambda http: http.get("/always500")).category is ErrorCategory.SERVER_ERROR
    assert upstream.hits("/always500") == 2
    error = failure(upstream, lambda http: http.get("/404"))
    assert (error.category, upstream.hits("/404")) == (ErrorCategory.CLIENT_ERROR, 1)  # not retried
    upstream.url = f"http://127.0.0.1:{closed_port}"
    assert failure(upstream, lambda http: http.get("/ok")).category is ErrorCategory.NETWORK


def test_a_slow_upstream_is_cut_at_the_attempts_timeout(upstream):
    integration(max_retries=0, attempt_timeout_ms=200, timeout_ms=1_000)
    started = time.monotonic()
    assert failure(upstream, lambda http: http.get("/slow")).category is ErrorCategory.TIMEOUT
    assert time.monotonic() - started < SLOW_S - 0.5


def test_a_get_is_cached_and_a_post_is_not(upstream):
    integration(cache_ttl_s=60)

    async def twice(http):
        return [(await http.get("/ok")).json() for _ in range(2)] + [(await http.post("/ok")).json()]

    assert run(upstream, twice) == [{"hits": 1}, {"hits": 1}, {"hits": 2}]


def test_fallbacks_given_to_the_client_serve_when_the_upstream_fails(upstream):
    integration(max_retries=0)
    served = httpx.Response(200, json={"from": "fallback"})
    response = run(upstream, lambda http: http.get("/always500"), fallbacks=(Fallback.value(served),))
    assert response.json() == {"from": "fallback"}


def test_the_async_client_refuses_streaming(upstream):
    integration()

    async def stream(http):
        async with http.stream("GET", "/ok"):
            pass

    with pytest.raises(ValueError, match="streaming"):
        run(upstream, stream)


@pytest.mark.django_db(transaction=True)  # off the event loop, the row is written by the writer thread
def test_a_request_that_finally_fails_leaves_its_dead_letter(upstream, closed_port):
    import dlq_test_handlers  # noqa: F401 - registers the dlq_test.* handlers
    from integrations.dlq import DeadLetter, subscriber
    from integrations.dlq.models import DeadLetter as DeadLetterEntry

    integration(max_retries=0)
    upstream.url = f"http://127.0.0.1:{closed_port}"
    failure(upstream, lambda http: http.request("POST", "/charges", json={"order": 7},
                                                dead_letter=DeadLetter("dlq_test.noop", {"order": 7})))
    subscriber.wait_for_pending_writes()
    entry = DeadLetterEntry.objects.get()
    assert (entry.handler_name, entry.integration_name, entry.last_error_category) == (
        "dlq_test.noop", "upstream", "network")


@pytest.mark.django_db(transaction=True)
def test_an_unloaded_policy_is_loaded_without_blocking_the_event_loop(upstream):
    integration()
    get_engine().registry.invalidate("upstream")

    async def main():
        async with AsyncClient("upstream", base_url=upstream.url) as http:
            return await http.get("/ok")

    assert asyncio.run(main()).status_code == 200


# -- connect, read and write timeouts (both clients) -------------------------------------------------

def sent_timeouts(upstream, client_class, path="/ok"):
    """The timeout httpx was given for each attempt, seen by a request hook (the request still goes out)."""
    seen = []

    def record(request):
        seen.append(request.extensions["timeout"])

    async def arecord(request):
        record(request)

    if client_class is Client:
        with Client("upstream", base_url=upstream.url, event_hooks={"request": [record]}) as http:
            http.get(path)
    else:
        run(upstream, lambda http: http.get(path), event_hooks={"request": [arecord]})
    return seen


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_each_phase_gets_its_own_timeout_within_the_attempts_time_left(upstream, client_class):
    integration(attempt_timeout_ms=2_000, timeout_ms=5_000, connect_timeout_ms=150, write_timeout_ms=400)
    started = time.monotonic()
    (timeout,) = sent_timeouts(upstream, client_class)
    elapsed = time.monotonic() - started
    assert timeout["connect"] == 0.15 and timeout["write"] == 0.4
    # unset: the attempt's 2 s less what had passed when it was sent (not the call's 5 s, not httpx's default)
    for phase in ("read", "pool"):
        assert 2.0 - elapsed <= timeout[phase] <= 2.0, (phase, timeout[phase], elapsed)


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_without_phase_timeouts_every_phase_has_the_attempts_time_left(upstream, client_class):
    integration(attempt_timeout_ms=300, timeout_ms=1_000)
    (timeout,) = sent_timeouts(upstream, client_class)
    assert len(set(timeout.values())) == 1 and 0.2 < timeout["read"] <= 0.3


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
@pytest.mark.parametrize("enforcement", ["thread", "inline"])
def test_a_read_timeout_ends_the_attempt_before_the_attempts_own_timeout(upstream, client_class, enforcement):
    integration(max_retries=0, attempt_timeout_ms=2_500, timeout_ms=3_000, read_timeout_ms=200,
                timeout_enforcement=enforcement)
    started = time.monotonic()
    if client_class is Client:
        with pytest.raises(ResilienceError) as caught, Client("upstream", base_url=upstream.url) as http:
            http.get("/slow")
        error = caught.value
    else:
        error = failure(upstream, lambda http: http.get("/slow"))
    assert error.category is ErrorCategory.TIMEOUT
    assert time.monotonic() - started < 1.5  # the read's 200 ms, not the attempt's 2.5 s


def test_a_phase_timeout_longer_than_the_attempt_is_refused_naming_it():
    from django.core.exceptions import ValidationError

    from integrations.models import Integration

    with pytest.raises(ValidationError) as caught:
        Integration(name="svc", attempt_timeout_ms=1_000, read_timeout_ms=5_000).full_clean()
    assert caught.value.message_dict["read_timeout_ms"] == [
        "Read timeout (5000 ms) must not exceed the attempt timeout (1000 ms), which ends the attempt first."]
