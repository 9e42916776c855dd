"""Pluggable client keys (RESILIENCE_RATE_LIMIT_CLIENT_KEY) and per-view limits (``@rate_limit``)."""

import asyncio

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.wsgi import WSGIHandler

from integrations.inbound import parse_rate, rate_limit
from integrations.resilience import Engine, use_engine
from integrations.resilience.redis_store import RedisStore
from integrations.resilience.state import LocalStore

from conftest import redis_url
from test_inbound import (SMALL_LIMITS, RecordingLimiter, limit_headers, make_token, redis_engine, statuses,
                          statuses_in_another_worker, store_with)

pytestmark = pytest.mark.urls("inbound_view_urls")

NEEDS_REDIS = "needs Redis: set REDIS_URL (the second run of .ci/run does)"
SETTING = "RESILIENCE_RATE_LIMIT_CLIENT_KEY"


@pytest.fixture(autouse=True)
def inbound_settings(settings):
    """test_inbound's small groups (under /api/ only), no proxies, no client key function."""
    settings.RESILIENCE_RATE_LIMITS = SMALL_LIMITS
    settings.RESILIENCE_TRUSTED_PROXIES = []
    settings.RESILIENCE_ADMIN_ALLOWED_IPS = []
    settings.RESILIENCE_RATE_LIMIT_CLIENT_KEY = ""
    return settings


@pytest.fixture(params=["local", "redis"])
def limiter_store(request, clock, bus):
    """The process engine's store, per process or in Redis: both must limit the same way."""
    if request.param == "local":
        yield LocalStore(clock)
        return
    if not redis_url():
        pytest.skip(NEEDS_REDIS)
    store = RedisStore(redis_url(), prefix=django_settings.RESILIENCE_KEY_PREFIX, clock=clock, bus=bus)
    yield store
    store.client.close()


@pytest.fixture(autouse=True)
def process_engine(fresh_default_engine, limiter_store, clock):
    with use_engine(Engine(store=limiter_store, clock=clock)):
        yield


def member_token(username, organisation=None):
    token = make_token(username)
    if organisation is not None:
        get_user_model().objects.get(username=username).groups.add(Group.objects.get_or_create(name=organisation)[0])
    return token


def recorded_keys(client, clock, path, **extra):
    recording = RecordingLimiter(clock)
    with use_engine(Engine(store=store_with(recording, clock), clock=clock)):
        client.get(path, **extra)
    return recording.keys


# -- the client key setting -----------------------------------------------------------------------


def check_errors_naming(setting):
    return [message.msg for message in checks.run_checks()
            if setting in message.msg and message.level >= checks.ERROR]


@pytest.mark.django_db
@pytest.mark.parametrize("value, wanted", [
    ("inbound_view_urls.no_such_function", "cannot be imported"),
    ("no_such_module.organisation", "cannot be imported"),
    ("inbound_view_urls.not_callable", "is not callable"),
    ("inbound_view_urls.two_arguments", "cannot be called with one argument, the request"),
    (42, "must be the dotted path of a function"),
])
def test_a_bad_client_key_setting_fails_check_naming_the_setting(settings, value, wanted):
    settings.RESILIENCE_RATE_LIMIT_CLIENT_KEY = value
    [message] = check_errors_naming(SETTING)
    assert message.startswith(SETTING) and wanted in message


def test_a_bad_client_key_setting_stops_the_site_at_start_up(settings):
    settings.RESILIENCE_RATE_LIMIT_CLIENT_KEY = "inbound_view_urls.no_such_function"
    with pytest.raises(ImproperlyConfigured, match=f"{SETTING} names 'inbound_view_urls.no_such_function'"):
        WSGIHandler()


@pytest.mark.django_db
def test_a_good_client_key_setting_passes_check(settings):
    settings.RESILIENCE_RATE_LIMIT_CLIENT_KEY = "inbound_view_urls.organisation"
    assert check_errors_naming(SETTING) == []


@pytest.mark.django_db
def test_members_of_one_organisation_spend_one_budget_and_others_fall_back_to_their_own(settings, client):
    settings.RESILIENCE_RATE_LIMIT_CLIENT_KEY = "inbound_view_urls.organisation"
    alice, bob = member_token("alice", "acme"), member_token("bob", "acme")
    carol, loner = member_token("carol", "globex"), member_token("loner")
    assert statuses(client, 2, "/api/export/", HTTP_AUTHORIZATION=f"Token {alice}") == [200, 429]
    assert statuses(client, 1, "/api/export/", HTTP_AUTHORIZATION=f"Token {bob}") == [429]
    assert statuses(client, 1, "/api/export/", HTTP_AUTHORIZATION=f"Token {carol}") == [200]
    # None from the function: the default chain, here the user's own token
    assert statuses(client, 2, "/api/export/", HTTP_AUTHORIZATION=f"Token {loner}") == [200, 429]
    assert statuses(client, 2, "/api/export/") == [200, 429]  # anonymous: the address


@pytest.mark.django_db
def test_the_middlewares_groups_count_by_the_organisation_too(settings, client, clock):
    settings.RESILIENCE_RATE_LIMIT_CLIENT_KEY = "inbound_view_urls.organisation"
    alice = member_token("alice", "acme")
    assert recorded_keys(client, clock, "/api/whoami/", HTTP_AUTHORIZATION=f"Token {alice}") == [
        "api_read:org:acme", "view.whoami:org:acme"]


@pytest.mark.parametrize("function, error", [("a_number", TypeError), ("broken", LookupError)])
def test_a_client_key_function_that_fails_lets_the_request_through_and_is_logged(settings, client, caplog,
                                                                                  function, error):
    settings.RESILIENCE_RATE_LIMIT_CLIENT_KEY = f"inbound_view_urls.{function}"
    assert statuses(client, 3, "/export/") == [200, 200, 200]
    records = [r for r in caplog.records if r.name == "integrations.inbound"]
    assert len(records) == 3 and records[0].exc_info[0] is error
    assert "'view.inbound_view_urls.export' not applied to GET /export/" in records[0].getMessage()
    if error is TypeError:
        assert "inbound_view_urls.a_number returned 42; it must return a non-empty string" in records[0].exc_text


# -- @rate_limit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate, wanted", [
    ("100/m", (100, 60.0)), ("10/s", (10, 1.0)), ("1000/5m", (1000, 300.0)), ("5000/day", (5000, 86400.0)),
    ("30 / 2h", (30, 7200.0)), ("1/min", (1, 60.0)),
])
def test_a_rate_is_a_count_per_period(rate, wanted):
    assert parse_rate(rate) == wanted


@pytest.mark.parametrize("rate", ["100/x", "0/m", "100/0m", "100", "100/M", "-1/m", "", 100, None])
def test_a_bad_rate_is_refused_naming_the_argument(rate):
    with pytest.raises(ValueError, match=r"rate_limit\(\): the argument 'rate' must be '<count>/<period>'") as info:
        rate_limit(rate)
    assert repr(rate) in str(info.value)


@pytest.mark.parametrize("arguments, error, wanted", [
    ({"key": "org:acme"}, TypeError, "the argument 'key' must be a function"),
    ({"name": "two words"}, ValueError, "the argument 'name' must be made of"),
    ({"methods": []}, ValueError, "the argument 'methods' must be HTTP methods"),
    ({"methods": ["GET /"]}, ValueError, "the argument 'methods' must be HTTP methods"),
])
def test_other_bad_arguments_are_refused_naming_them(arguments, error, wanted):
    with pytest.raises(error, match=wanted):
        rate_limit("10/m", **arguments)


def test_a_limited_view_says_its_limit_on_every_response_and_answers_429_past_it(client, clock):
    responses = [client.get("/export/") for _ in range(2)]
    assert [(r.status_code, limit_headers(r)) for r in responses] == [(200, (2, 1, 60)), (200, (2, 0, 60))]
    clock.advance(20.5)
    refused = client.get("/export/")
    assert (refused.status_code, refused["Retry-After"], limit_headers(refused)) == (429, "40", (2, 0, 40))
    error = refused.json()["error"]
    assert (error["code"], error["retry_after"]) == ("rate_limited", 40)
    assert "at most 2 per 60 s for view.inbound_view_urls.export" in error["message"]
    clock.advance(40)
    assert statuses(client, 1, "/export/") == [200]


def test_a_view_key_gives_each_tenant_a_budget_and_falls_back_to_the_address(client):
    assert statuses(client, 3, "/tenant-report/", HTTP_X_TENANT="acme") == [200, 200, 429]
    assert statuses(client, 1, "/tenant-report/", HTTP_X_TENANT="globex") == [200]
    assert statuses(client, 3, "/tenant-report/") == [200, 200, 429]
    assert statuses(client, 1, "/tenant-report/", REMOTE_ADDR="203.0.113.9") == [200]


@pytest.mark.django_db
def test_a_view_key_comes_before_the_sites_client_key(settings, client, clock):
    settings.RESILIENCE_RATE_LIMIT_CLIENT_KEY = "inbound_view_urls.organisation"
    alice = member_token("alice", "acme")
    auth = {"HTTP_AUTHORIZATION": f"Token {alice}"}
    assert recorded_keys(client, clock, "/tenant-report/", HTTP_X_TENANT="t1", **auth) == [
        "view.inbound_view_urls.tenant_report:tenant:t1"]
    assert recorded_keys(client, clock, "/tenant-report/", **auth) == [
        "view.inbound_view_urls.tenant_report:org:acme"]


def test_views_with_one_name_share_one_budget(client):
    assert [client.get(path).status_code for path in ("/reports/daily/", "/reports/weekly/") * 2] == \
        [200, 200, 200, 429]


def test_methods_limits_only_those_methods(client):
    assert [client.post("/comment/").status_code for _ in range(2)] == [200, 429]
    answer = client.get("/comment/")
    assert answer.status_code == 200 and not answer.has_header("X-RateLimit-Limit")


def test_an_async_view_is_limited_the_same_way(client):
    responses = [client.get("/async-export/") for _ in range(3)]
    assert [(r.status_code, r["X-RateLimit-Remaining"]) for r in responses] == [(200, "1"), (200, "0"), (429, "0")]


def test_an_async_view_is_limited_under_asgi_too(async_client):
    async def three_requests():
        return [(await async_client.get("/async-export/")).status_code for _ in range(3)]

    assert asyncio.run(three_requests()) == [200, 200, 429]


def test_a_class_based_view_is_limited_through_method_decorator(client):
    assert statuses(client, 3, "/api/whoami/") == [200, 200, 429]


def test_under_the_api_the_headers_report_the_tighter_of_the_group_and_the_view(client):
    first = client.get("/api/export/")  # api_read: 3 per 60 s; the view: 1 per 60 s
    assert (first.status_code, limit_headers(first)) == (200, (1, 0, 60))
    second = client.get("/api/export/")
    assert (second.status_code, limit_headers(second)) == (429, (1, 0, 60))
    assert "view.inbound_view_urls.api_export" in second.json()["error"]["message"]


def test_a_fault_in_the_limiter_lets_a_limited_view_answer_and_is_logged(client, clock, caplog):
    class BrokenLimiter(RecordingLimiter):
        def hit(self, key, limit, window_s):
            raise RuntimeError("a bug in the limiter")

    with use_engine(Engine(store=store_with(BrokenLimiter(clock), clock), clock=clock)):
        response = client.get("/export/")
    assert response.status_code == 200 and not response.has_header("X-RateLimit-Limit")
    (record,) = [r for r in caplog.records if r.name == "integrations.inbound"]
    assert record.exc_info[0] is RuntimeError


# -- one limit for the fleet, in Redis ---------------------------------------------------------------


@pytest.mark.skipif(not redis_url(), reason=NEEDS_REDIS)
@pytest.mark.parametrize("limiter_store", ["redis"], indirect=True)
def test_two_worker_processes_share_a_views_limit_in_redis(settings, client):
    assert statuses_in_another_worker(settings.RESILIENCE_KEY_PREFIX, 1, "/export/") == [200]
    engine = redis_engine(settings.RESILIENCE_KEY_PREFIX)
    with use_engine(engine):
        responses = [client.get("/export/") for _ in range(2)]
    assert [(r.status_code, r["X-RateLimit-Remaining"]) for r in responses] == [(200, "0"), (429, "0")]
    keys = [key.decode() for key in engine.store.client.scan_iter(f"{settings.RESILIENCE_KEY_PREFIX}:*")]
    assert keys == [f"{settings.RESILIENCE_KEY_PREFIX}:ratelimit:view.inbound_view_urls.export:ip:127.0.0.1"]
