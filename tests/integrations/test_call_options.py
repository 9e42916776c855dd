"""Retry that knows what it retries, per-call overrides and deadlines that flow (issue 15, items 3 and 6).

The engine runs on a FakeClock (make_engine); the http Client's rules run against the real
HTTP server of tests/http_support.py.
"""

import asyncio
import json
import time

import pytest

from http_support import closed_port, http_server, integration, upstream  # noqa: F401 - fixtures
from integrations.errors import ErrorCategory, ResilienceError
from integrations.http import AsyncClient, Client
from integrations.resilience import CallOptions, aexecute, deadline, execute, get_engine, resilient
from integrations.resilience.policy import InvalidPolicy, Policy


class Script:
    """Each call pops the next step: a value to return or an exception to raise."""

    def __init__(self, *steps):
        self.steps = list(steps)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


def server_error():
    return ResilienceError(ErrorCategory.SERVER_ERROR, "503 from upstream")


# -- retry_on: the categories an integration retries --------------------------------------


def test_only_the_categories_in_retry_on_are_retried(make_engine):
    make_engine(max_retries=3, retry_on="timeout", base_delay_ms=1, max_delay_ms=1)
    network = Script(ConnectionError("refused"), "ok")
    timeout = Script(TimeoutError("slow"), "ok")

    assert execute("svc", network).error.category is ErrorCategory.NETWORK and network.calls == 1
    assert execute("svc", timeout).value == "ok" and timeout.calls == 2


def test_retry_on_can_name_a_category_not_retried_by_default(make_engine):
    make_engine(max_retries=2, retry_on="client_error,server_error", base_delay_ms=1, max_delay_ms=1)
    conflict = Script(ResilienceError(ErrorCategory.CLIENT_ERROR, "409 conflict"), "ok")

    assert execute("svc", conflict).value == "ok" and conflict.calls == 2


def test_the_default_retries_what_the_contract_calls_retryable(make_engine):
    engine = make_engine()
    policy = engine.registry.get("svc")
    retried = {category for category in ErrorCategory if policy.retries(category)}
    assert retried == {category for category in ErrorCategory if category.retryable}


# -- retry on a result ------------------------------------------------------------------


def test_a_value_retry_if_result_rejects_is_retried_until_a_wanted_one(make_engine):
    make_engine(max_retries=3, base_delay_ms=1, max_delay_ms=1)
    report = Script({"status": "pending"}, {"status": "pending"}, {"status": "done"})

    result = execute("svc", report, call_options=CallOptions(retry_if_result=lambda r: r["status"] == "pending"))

    assert (result.ok, result.value, result.attempts) == (True, {"status": "done"}, 3)


def test_once_the_retries_are_spent_the_last_value_is_the_calls_and_it_is_not_cached(make_engine):
    engine = make_engine(max_retries=1, base_delay_ms=1, max_delay_ms=1, cache_ttl_s=60)
    pending = Script("pending", "pending", "done")
    options = CallOptions(retry_if_result=lambda value: value == "pending")

    first = execute("svc", pending, cache_key="report-7", call_options=options)
    second = execute("svc", pending, cache_key="report-7", call_options=options)

    assert (first.ok, first.value, first.attempts, first.source) == (True, "pending", 2, "live")
    assert (second.value, second.source, pending.calls) == ("done", "live", 3)  # not served "pending" from cache
    assert engine.breaker("svc").consecutive_failures == 0  # an unwanted value is not the upstream's fault


def test_a_failure_after_a_rejected_value_is_the_calls_outcome(make_engine):
    make_engine(max_retries=1, base_delay_ms=1, max_delay_ms=1, retry_on="server_error")
    steps = Script("pending", ResilienceError(ErrorCategory.CLIENT_ERROR, "410 gone"))

    result = execute("svc", steps, call_options=CallOptions(retry_if_result=lambda value: value == "pending"))

    assert (result.ok, result.error.category, result.attempts) == (False, ErrorCategory.CLIENT_ERROR, 2)


def test_retry_if_error_narrows_which_retryable_failures_are_retried(make_engine):
    make_engine(max_retries=3, base_delay_ms=1, max_delay_ms=1)
    steps = Script(server_error(), ResilienceError(ErrorCategory.TIMEOUT, "slow"), "ok")

    result = execute("svc", steps,
                     call_options=CallOptions(retry_if_error=lambda error: error.category is ErrorCategory.SERVER_ERROR))

    assert (result.ok, result.error.category, steps.calls) == (False, ErrorCategory.TIMEOUT, 2)


# -- per-call overrides ---------------------------------------------------------------------


def test_a_call_can_override_the_retries_and_timeouts_of_its_integration(make_engine):
    make_engine(max_retries=3, base_delay_ms=1, max_delay_ms=1)
    failing = Script(server_error(), server_error(), "ok")

    result = execute("svc", failing, call_options=CallOptions(max_retries=0))

    assert (result.ok, result.attempts) == (False, 1)


def test_the_decorator_applies_its_call_options_to_every_call(make_engine):
    make_engine(max_retries=3, base_delay_ms=1, max_delay_ms=1)
    steps = Script(server_error(), "ok")

    @resilient("svc", call_options=CallOptions(max_retries=0))
    def lookup():
        return steps()

    with pytest.raises(ResilienceError):
        lookup()
    assert steps.calls == 1


@pytest.mark.parametrize("field, value, message", [
    ("max_retries", -1, "Must be between 0 and 20."),
    ("timeout_ms", 0, "Must be at least 1."),
    ("attempt_timeout_ms", 2.5, "Expected an integer, got 2.5."),
    ("retry_if_result", "pending", "Expected a callable, got 'pending'."),
])
def test_bad_call_options_are_refused_naming_the_field(field, value, message):
    with pytest.raises(InvalidPolicy) as caught:
        CallOptions(**{field: value})
    assert caught.value.errors == {field: message}


def test_call_options_of_the_wrong_type_are_a_clear_type_error(make_engine):
    make_engine()
    with pytest.raises(TypeError, match=r"call_options must be integrations.resilience.CallOptions"):
        execute("svc", lambda: 1, call_options={"max_retries": 0})


# -- deadlines that flow --------------------------------------------------------------------


def test_a_call_made_past_the_deadline_is_refused_before_any_attempt(make_engine):
    make_engine()
    operation = Script("ok")

    with deadline(-0.001):
        result = execute("svc", operation)

    assert (result.ok, result.error.category, result.attempts, operation.calls) == (False, ErrorCategory.TIMEOUT, 0, 0)
    assert result.error.message == "the deadline of the request this call serves has passed"


def test_a_call_gets_only_the_time_left_before_the_deadline(make_engine):
    make_engine(timeout_enforcement="thread", attempt_timeout_ms=5_000, timeout_ms=30_000, max_retries=0)
    release = __import__("threading").Event()

    with deadline(0.2):
        result = execute("svc", lambda: release.wait(10))
    release.set()

    assert result.error.category is ErrorCategory.TIMEOUT
    # the attempt's own 5 s were trimmed to what the deadline left (under 200 ms)
    timeout_ms = int(str(result.error.__cause__).split("its ")[1].split(" ms")[0])
    assert 0 < timeout_ms <= 200


def test_nested_deadlines_keep_the_earliest():
    from integrations.resilience.options import time_left

    assert time_left() is None
    with deadline(10):
        with deadline(0.5):
            assert time_left() <= 0.5
            with deadline(60):
                assert time_left() <= 0.5
        assert 0.5 < time_left() <= 10
    assert time_left() is None


@pytest.mark.parametrize("bad", ["1", None, True, float("nan")])
def test_a_deadline_must_be_a_number_of_seconds(bad):
    with pytest.raises(TypeError, match="deadline\\(\\) takes seconds as a number"):
        with deadline(bad):
            pass


def test_async_calls_see_the_deadline_of_their_context(make_engine):
    make_engine()

    async def fetch():
        return "ok"

    async def main():
        with deadline(-1):
            return await aexecute("svc", fetch)

    assert asyncio.run(main()).error.category is ErrorCategory.TIMEOUT


# -- the http Client and methods a retry could repeat ------------------------------------------


@pytest.mark.django_db
def test_a_post_is_not_retried_after_the_upstream_got_it(upstream):
    integration(max_retries=3)
    with Client("upstream", base_url=upstream.url) as http:
        with pytest.raises(ResilienceError) as caught:
            http.post("/always500", json={"amount": 10})
    assert caught.value.category is ErrorCategory.SERVER_ERROR
    assert upstream.hits("/always500") == 1


@pytest.mark.django_db
@pytest.mark.parametrize("how", ["header", "flag"])
def test_a_post_with_an_idempotency_key_or_said_idempotent_is_retried(upstream, how):
    integration(max_retries=2)
    with Client("upstream", base_url=upstream.url) as http:
        with pytest.raises(ResilienceError):
            if how == "header":
                http.post("/always500", json={}, headers={"Idempotency-Key": "order-7"})
            else:
                http.request("POST", "/always500", json={}, idempotent=True)
    assert upstream.hits("/always500") == 3


@pytest.mark.django_db
def test_a_post_the_upstream_refused_with_429_is_retried(upstream):
    integration(max_retries=2)
    with Client("upstream", base_url=upstream.url) as http:
        assert http.post("/429", json={}).status_code == 200
    assert upstream.hits("/429") == 2


@pytest.mark.django_db
def test_a_post_that_could_not_connect_is_retried(closed_port):
    integration(max_retries=2)
    attempts = []
    with Client("upstream", base_url=f"http://127.0.0.1:{closed_port}") as http:
        with pytest.raises(ResilienceError) as caught:
            http.request("POST", "/charges", json={}, call_options=CallOptions(
                retry_if_error=lambda error: attempts.append(error) or True))
    assert caught.value.category is ErrorCategory.NETWORK
    assert len(attempts) == 2  # asked for each retry the policy allows: connecting failed, nothing was sent


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["PUT", "DELETE", "GET"])
def test_idempotent_methods_are_retried(upstream, method):
    integration(max_retries=1)
    with Client("upstream", base_url=upstream.url) as http:
        with pytest.raises(ResilienceError):
            http.request(method, "/always500")
    assert upstream.hits("/always500") == 2


@pytest.mark.django_db
def test_a_request_can_carry_call_options(upstream):
    integration(max_retries=3)
    with Client("upstream", base_url=upstream.url) as http:
        with pytest.raises(ResilienceError):
            http.request("GET", "/always500", call_options=CallOptions(max_retries=0))
    assert upstream.hits("/always500") == 1


@pytest.mark.django_db
def test_the_async_client_does_not_retry_a_post_the_upstream_got(upstream):
    integration(max_retries=3)
    get_engine().registry.get("upstream")  # loaded first, as a site's first sync call would

    async def main():
        async with AsyncClient("upstream", base_url=upstream.url) as http:
            with pytest.raises(ResilienceError):
                await http.post("/always500", json={})

    asyncio.run(main())
    assert upstream.hits("/always500") == 1


@pytest.mark.django_db
def test_bad_request_extras_are_refused(upstream):
    integration()
    with Client("upstream", base_url=upstream.url) as http:
        with pytest.raises(TypeError, match="idempotent must be True or False"):
            http.request("POST", "/ok", idempotent="yes")
        with pytest.raises(TypeError, match="call_options must be"):
            http.request("GET", "/ok", call_options=3)


# -- RequestDeadlineMiddleware: the request's budget, from RESILIENCE_REQUEST_BUDGETS ------------------


def seen_by_view(settings, rf, path, budgets, is_async=False):
    """What time_left() a view of ``path`` sees under the middleware."""
    from django.http import HttpResponse

    from integrations.inbound import RequestDeadlineMiddleware
    from integrations.resilience.options import time_left

    settings.RESILIENCE_REQUEST_BUDGETS = budgets
    seen = []

    def view(request):
        seen.append(time_left())
        return HttpResponse("ok")

    async def async_view(request):
        return view(request)

    middleware = RequestDeadlineMiddleware(async_view if is_async else view)
    response = middleware(rf.get(path))
    if is_async:
        response = asyncio.run(response)
    assert response.status_code == 200
    return seen[0]


@pytest.mark.parametrize("is_async", [False, True])
def test_the_middleware_gives_a_request_the_budget_of_its_longest_matching_prefix(settings, rf, is_async):
    budgets = {"/": 30_000, "/api/": 2_000, "/api/reports/": 9_000}
    started = time.monotonic()
    seen = seen_by_view(settings, rf, "/api/orders/", budgets, is_async)
    # the 2 s of /api/ less what passed while the view ran: not the 30 s of "/", not the 9 s of /api/reports/
    assert 2.0 - (time.monotonic() - started) <= seen <= 2.0
    assert 2.0 < seen_by_view(settings, rf, "/api/reports/7/", budgets, is_async) <= 9.0
    assert 9.0 < seen_by_view(settings, rf, "/checkout/", budgets, is_async) <= 30.0


def test_a_request_no_prefix_matches_has_no_budget(settings, rf):
    assert seen_by_view(settings, rf, "/checkout/", {"/api/": 2_000}) is None


def test_a_guarded_call_after_the_requests_budget_is_refused_without_reaching_the_upstream(settings, rf, make_engine):
    import time as _time

    from django.http import JsonResponse

    from integrations.inbound import RequestDeadlineMiddleware

    make_engine()
    settings.RESILIENCE_REQUEST_BUDGETS = {"/api/": 5}
    upstream = Script("ok")

    def view(request):
        _time.sleep(0.05)  # the view spends its 5 ms budget before calling out
        result = execute("svc", upstream)
        return JsonResponse({"category": result.error.category.value, "attempts": result.attempts})

    response = RequestDeadlineMiddleware(view)(rf.get("/api/orders/"))
    assert json.loads(response.content) == {"category": "timeout", "attempts": 0} and upstream.calls == 0


def test_the_overrides_follow_the_policy_they_are_applied_to():
    options = CallOptions(timeout_ms=1_000)
    first = Policy("svc", base_delay_ms=1)
    reloaded = first.replace(base_delay_ms=7)  # the integration was saved: a new policy

    applied, applied_again, applied_reloaded = (options.applied_to(first), options.applied_to(first),
                                                options.applied_to(reloaded))

    assert (applied.timeout_ms, applied.base_delay_ms) == (1_000, 1) and applied_again is applied
    assert (applied_reloaded.timeout_ms, applied_reloaded.base_delay_ms) == (1_000, 7)
    assert first.timeout_ms == 30_000  # the integration's own policy is untouched
