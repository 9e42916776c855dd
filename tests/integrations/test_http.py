"""integrations.http.Client against a real HTTP server on 127.0.0.1 (tests/http_support.py)."""

import email.utils
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from django.core.exceptions import ImproperlyConfigured

from http_support import SLOW_S, closed_port, http_server, integration, upstream  # noqa: F401 - fixtures
from integrations.errors import ErrorCategory, ResilienceError
from integrations.http import Client
from integrations.resilience import Fallback
from integrations.resilience.retry import parse_retry_after


def client(upstream, name="upstream", **kwargs):
    return Client(name, base_url=upstream.url, **kwargs)


def failure_of(call):
    with pytest.raises(ResilienceError) as caught:
        call()
    return caught.value


pytestmark = pytest.mark.django_db


# -- successes and retries ------------------------------------------------------


def test_it_returns_the_httpx_response_of_a_200(upstream):
    integration()

    with client(upstream) as http:
        response = http.get("/ok")

    assert isinstance(response, httpx.Response)
    assert response.status_code == 200
    assert response.json() == {"hits": 1}


def test_it_retries_a_503_twice_then_returns_the_200(upstream):
    integration(max_retries=3)

    with client(upstream) as http:
        response = http.get("/flaky")

    assert response.status_code == 200
    assert upstream.hits("/flaky") == 3


def test_it_raises_server_error_after_one_plus_max_retries_requests_to_an_always_failing_upstream(upstream):
    integration(max_retries=2)

    with client(upstream) as http:
        error = failure_of(lambda: http.get("/always500"))

    assert error.category is ErrorCategory.SERVER_ERROR
    assert error.integration == "upstream"
    assert error.details["status"] == 500
    assert upstream.hits("/always500") == 3


def test_it_retries_a_429_then_returns_the_200(upstream):
    integration(max_retries=2)

    with client(upstream) as http:
        response = http.get("/429")

    assert response.status_code == 200
    assert upstream.hits("/429") == 2


def test_it_raises_rate_limit_when_the_upstream_keeps_answering_429(upstream):
    integration(max_retries=1)

    with client(upstream) as http:
        error = failure_of(lambda: http.get("/always429"))

    assert error.category is ErrorCategory.RATE_LIMIT
    assert error.retry_after == 0.0
    assert upstream.hits("/always429") == 2


def test_it_waits_the_retry_after_the_upstream_asks_for_before_retrying(upstream):
    # base and max delay would allow a retry after 1 ms; the upstream asks for 1 s.
    integration(max_retries=1, base_delay_ms=1, max_delay_ms=5_000)

    with client(upstream) as http:
        response = http.get("/429-wait-1s")

    assert response.status_code == 200
    first, second = upstream.arrivals["/429-wait-1s"]
    assert second - first >= 0.95


def test_it_caps_a_retry_after_at_max_delay_ms(upstream):
    integration(max_retries=1, max_delay_ms=5)
    started = time.monotonic()

    with client(upstream) as http:
        response = http.get("/429-wait-1h")

    assert response.status_code == 200
    assert upstream.hits("/429-wait-1h") == 2
    assert time.monotonic() - started < 60  # nowhere near the hour the upstream asked for


def test_parse_retry_after_reads_a_number_of_seconds():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0


def test_parse_retry_after_reads_an_http_date():
    now = datetime(2015, 10, 21, 7, 27, 0, tzinfo=timezone.utc)
    header = email.utils.format_datetime(now + timedelta(seconds=60), usegmt=True)

    assert header == "Wed, 21 Oct 2015 07:28:00 GMT"
    assert parse_retry_after(header, now=now.timestamp()) == 60.0


def test_parse_retry_after_gives_zero_for_a_date_in_the_past():
    now = datetime(2015, 10, 21, 7, 30, 0, tzinfo=timezone.utc)

    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now.timestamp()) == 0.0


@pytest.mark.parametrize("header", [None, "", "soon", "-", "Blursday, 99 Foo 2015"])
def test_parse_retry_after_ignores_a_missing_or_unreadable_header(header):
    assert parse_retry_after(header) is None


# -- client errors ----------------------------------------------------------------


def test_a_404_raises_client_error_without_a_retry(upstream):
    integration(max_retries=3)

    with client(upstream) as http:
        error = failure_of(lambda: http.get("/404"))

    assert error.category is ErrorCategory.CLIENT_ERROR
    assert error.details["status"] == 404
    assert upstream.hits("/404") == 1


def test_404s_do_not_count_toward_the_breaker(upstream):
    integration(max_retries=0, failure_threshold=2)

    with client(upstream) as http:
        for _ in range(3):
            failure_of(lambda: http.get("/404"))
        response = http.get("/ok")

    assert response.status_code == 200
    assert upstream.hits("/ok") == 1


# -- network errors and timeouts -----------------------------------------------------


def test_a_refused_connection_raises_network(closed_port):
    integration(max_retries=1)

    with Client("upstream", base_url=f"http://127.0.0.1:{closed_port}") as http:
        error = failure_of(lambda: http.get("/ok"))

    assert error.category is ErrorCategory.NETWORK
    assert error.retryable


def test_a_slow_upstream_raises_timeout_long_before_it_answers(upstream):
    integration(max_retries=0, attempt_timeout_ms=200, timeout_ms=1_000)
    started = time.monotonic()

    with client(upstream) as http:
        error = failure_of(lambda: http.get("/slow"))

    assert error.category is ErrorCategory.TIMEOUT
    assert time.monotonic() - started < SLOW_S - 0.5


def test_a_slow_upstream_raises_timeout_under_inline_enforcement_too(upstream):
    # no worker thread: httpx's own timeout, set to the attempt's budget, ends the request
    integration(max_retries=0, attempt_timeout_ms=200, timeout_ms=1_000, timeout_enforcement="inline")
    started = time.monotonic()

    with client(upstream) as http:
        error = failure_of(lambda: http.get("/slow"))

    assert error.category is ErrorCategory.TIMEOUT
    assert time.monotonic() - started < SLOW_S - 0.5


# -- circuit breaker ------------------------------------------------------------------


def test_the_breaker_opens_after_failure_threshold_failures_and_then_refuses_without_a_request(upstream):
    integration(max_retries=0, failure_threshold=2, reset_timeout_s=60)

    with client(upstream) as http:
        for _ in range(2):
            assert failure_of(lambda: http.get("/always500")).category is ErrorCategory.SERVER_ERROR
        refused = failure_of(lambda: http.get("/always500"))
        refused_healthy_path = failure_of(lambda: http.get("/ok"))

    assert refused.category is ErrorCategory.CIRCUIT_OPEN
    assert refused_healthy_path.category is ErrorCategory.CIRCUIT_OPEN
    assert upstream.hits("/always500") == 2
    assert upstream.hits("/ok") == 0


# -- cache -----------------------------------------------------------------------------


def test_a_get_is_served_from_the_cache_within_its_ttl(upstream):
    integration(cache_ttl_s=60)

    with client(upstream) as http:
        first = http.get("/ok")
        second = http.get("/ok")

    assert first.json() == second.json() == {"hits": 1}
    assert upstream.hits("/ok") == 1


def test_a_get_is_not_cached_when_the_ttl_is_zero(upstream):
    integration(cache_ttl_s=0)

    with client(upstream) as http:
        http.get("/ok")
        second = http.get("/ok")

    assert second.json() == {"hits": 2}
    assert upstream.hits("/ok") == 2


def test_a_post_is_never_served_from_the_cache(upstream):
    integration(cache_ttl_s=60)

    with client(upstream) as http:
        http.post("/ok", json={"n": 1})
        second = http.post("/ok", json={"n": 1})

    assert second.json() == {"hits": 2}
    assert upstream.hits("/ok") == 2


# -- fallbacks ---------------------------------------------------------------------------


def test_a_value_fallback_given_to_the_client_serves_when_the_upstream_fails(upstream):
    integration(max_retries=1)
    placeholder = httpx.Response(200, json={"placeholder": True})

    with client(upstream, fallbacks=(Fallback.value(placeholder),)) as http:
        response = http.get("/always500")

    assert response.json() == {"placeholder": True}
    assert upstream.hits("/always500") == 2


def test_a_last_known_fallback_serves_the_last_good_response_when_the_upstream_goes_down(upstream):
    integration(max_retries=0)

    with client(upstream, fallbacks=(Fallback.last_known(),)) as http:
        live = http.get("/up-then-down")
        served = http.get("/up-then-down")

    assert live.json() == served.json() == {"hits": 1}
    assert upstream.hits("/up-then-down") == 2


def test_the_client_still_raises_when_no_fallback_yields(upstream):
    integration(max_retries=0)

    with client(upstream, fallbacks=(Fallback.cache(),)) as http:  # nothing was ever cached
        error = failure_of(lambda: http.get("/always500"))

    assert error.category is ErrorCategory.SERVER_ERROR


# -- configuration ----------------------------------------------------------------------


def test_an_unknown_integration_raises_improperly_configured_naming_it(upstream):
    with Client("no-such-integration", base_url=upstream.url) as http:
        with pytest.raises(ImproperlyConfigured, match="no-such-integration"):
            http.get("/ok")

    assert upstream.hits("/ok") == 0


def test_the_client_refuses_streaming():
    with Client("upstream", base_url="http://127.0.0.1:9") as http:
        with pytest.raises(ValueError, match="streaming"):
            with http.stream("GET", "/ok"):
                pass


@pytest.mark.django_db
def test_a_request_that_finally_fails_leaves_its_dead_letter(closed_port):
    import dlq_test_handlers  # noqa: F401 - registers the dlq_test.* handlers
    from integrations.dlq import DeadLetter
    from integrations.dlq.models import DeadLetter as DeadLetterEntry

    integration("upstream", max_retries=0)
    with Client("upstream", base_url=f"http://127.0.0.1:{closed_port}") as http:
        with pytest.raises(ResilienceError):
            http.request("POST", "/charges", json={"order": 7},
                         dead_letter=DeadLetter("dlq_test.noop", {"order": 7}, idempotency_key="order-7"))
    entry = DeadLetterEntry.objects.get()
    assert (entry.handler_name, entry.payload, entry.idempotency_key) == ("dlq_test.noop", {"order": 7}, "order-7")
    assert (entry.integration_name, entry.last_error_category) == ("upstream", "network")
