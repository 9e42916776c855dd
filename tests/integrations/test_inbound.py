"""Inbound protection (integrations.inbound.py): rate limits, the admin allowlist, security headers."""

import hashlib
import ipaddress
import json
import multiprocessing
import os
import re
import secrets
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.wsgi import WSGIHandler
from django.db import connection
from django.http import HttpResponse
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token

from integrations.resilience import Engine, Policy, use_engine
from integrations.resilience.events import EventBus
from integrations.resilience.rate_limit import LocalRateLimiter
from integrations.resilience.redis_store import RedisStore
from integrations.resilience.state import LocalStore
from integrations.conf import DEFAULT_RATE_LIMITS, app_settings
from integrations.conf import rate_limit_groups
from integrations.inbound import ContentSecurityPolicyMiddleware, client_ip

from conftest import redis_url

pytestmark = pytest.mark.urls("inbound_urls")

ROOT = Path(__file__).resolve().parents[2]
NEEDS_REDIS = "needs Redis: set REDIS_URL (the second run of .ci/run does)"
FORK = multiprocessing.get_context("fork")

SMALL_LIMITS = {
    "api_read": {"paths": ["/api/"], "methods": ["GET", "HEAD", "OPTIONS"], "limit": 3, "window_s": 60},
    "api_write": {"paths": ["/api/"], "methods": ["POST", "PUT", "PATCH", "DELETE"], "limit": 2, "window_s": 60},
    "admin_login": {"paths": ["/admin/login/"], "methods": ["POST"], "limit": 2, "window_s": 60},
}
PROXY = "10.0.0.1"
TRUSTED_PROXIES = ["10.0.0.0/24"]


@pytest.fixture(autouse=True)
def inbound_settings(settings):
    """Small limits, no proxies, an open admin; set before a test's first request builds the middlewares."""
    settings.RESILIENCE_RATE_LIMITS = SMALL_LIMITS
    settings.RESILIENCE_TRUSTED_PROXIES = []
    settings.RESILIENCE_ADMIN_ALLOWED_IPS = []
    return settings


@pytest.fixture(autouse=True)
def per_process_engine(fresh_default_engine, clock):
    """The process's engine counts on a per-process store driven by the test's FakeClock."""
    with use_engine(Engine(store=LocalStore(clock), clock=clock)):
        yield


def limit_headers(response):
    return tuple(int(response[name]) for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"))


def statuses(client, count, path="/api/ping/", **extra):
    return [client.get(path, **extra).status_code for _ in range(count)]


# -- configuration ----------------------------------------------------------------------------


def test_the_default_groups_separate_api_reads_api_writes_and_admin_logins():
    groups = {group.name: group for group in rate_limit_groups(DEFAULT_RATE_LIMITS)}
    assert (groups["api_read"].limit, groups["api_write"].limit, groups["admin_login"].limit) == (100, 10, 5)
    assert groups["api_read"].matches("/api/integrations/", "GET")
    assert groups["api_write"].matches("/api/dlq/retry/", "POST")
    assert groups["admin_login"].matches("/admin/login/", "POST")
    assert not any(group.matches("/admin/login/", "GET") for group in groups.values())
    assert {"/api/health/", "/metrics"} <= set(app_settings.specs["RATE_LIMIT_EXEMPT_PATHS"].default)


def api_group(**fields):
    """RESILIENCE_RATE_LIMITS with one group, "api": a valid one changed by ``fields`` (None: left out)."""
    spec = {"paths": ["/api/"], "limit": 1, "window_s": 1, **fields}
    return {"api": {field: value for field, value in spec.items() if value is not None}}


@pytest.mark.parametrize("config, where", [
    ([], " must be a dict"),
    ({"api read": {"paths": ["/api/"], "limit": 1, "window_s": 1}}, "['api read']: a group's name"),
    ({"api": ["/api/", 1, 1]}, "['api'] must be a dict"),
    (api_group(windows=1), "['api']['windows'] is not a field"),
    (api_group(limit=None), "['api']['limit'] is required"),
    (api_group(paths="/api/"), "['api']['paths']"),
    (api_group(paths=["api/"]), "['api']['paths']"),
    (api_group(methods=["GE T"]), "['api']['methods']"),
    (api_group(methods=[]), "['api']['methods']"),
    (api_group(limit=0), "['api']['limit']"),
    (api_group(limit=True), "['api']['limit']"),
    (api_group(limit="10"), "['api']['limit']"),
    (api_group(window_s=0), "['api']['window_s']"),
    (api_group(window_s="60"), "['api']['window_s']"),
    (api_group(window_s=float("inf")), "['api']['window_s']"),
])
def test_a_bad_group_is_refused_naming_the_group_and_the_field(config, where):
    with pytest.raises(ImproperlyConfigured, match=re.escape(f"RESILIENCE_RATE_LIMITS{where}")):
        rate_limit_groups(config)


def test_methods_are_matched_whatever_their_case_in_settings():
    (group,) = rate_limit_groups({"login": {"paths": ["/login/"], "methods": ["post"], "limit": 1, "window_s": 1}})
    assert group.matches("/login/", "POST")


@pytest.mark.parametrize("name, value", [
    ("RESILIENCE_RATE_LIMITS", api_group(limit=-1)),
    ("RESILIENCE_TRUSTED_PROXIES", "10.0.0.0/8"),
    ("RESILIENCE_TRUSTED_PROXIES", ["10.0.0.0/33"]),
    ("RESILIENCE_ADMIN_ALLOWED_IPS", ["not-a-network"]),
    ("RESILIENCE_RATE_LIMIT_EXEMPT_PATHS", ["metrics"]),
    ("RESILIENCE_CONTENT_SECURITY_POLICY", "default-src 'self'\r\nX-Injected: 1"),
])
def test_a_bad_setting_stops_the_site_at_start_up(settings, name, value):
    setattr(settings, name, value)
    with pytest.raises(ImproperlyConfigured, match=name):
        WSGIHandler()


def run_settings(env_overrides, code="import resilience_site.settings"):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "resilience_site.settings", **env_overrides}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_rate_limits_can_come_from_the_environment_as_json():
    groups = {"api_read": {"paths": ["/api/"], "methods": ["GET"], "limit": 7, "window_s": 10}}
    result = run_settings({"RESILIENCE_RATE_LIMITS": json.dumps(groups)},
                          "import json, resilience_site.settings as s; print(json.dumps(s.RESILIENCE_RATE_LIMITS))")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == groups


def test_rate_limits_that_are_not_json_stop_the_settings():
    result = run_settings({"RESILIENCE_RATE_LIMITS": "{api_read: 100}"})
    assert result.returncode != 0
    assert "RESILIENCE_RATE_LIMITS must be a JSON object of route groups" in result.stderr


# -- limits per group and per client ---------------------------------------------------------


def test_api_responses_say_the_limit_what_remains_and_when_it_resets(client):
    responses = [client.get("/api/ping/") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [limit_headers(r) for r in responses] == [(3, 2, 60), (3, 1, 60), (3, 0, 60)]


def test_past_the_limit_the_answer_is_429_with_the_error_shape_and_retry_after(client, clock):
    statuses(client, 3)
    clock.advance(15.5)
    response = client.get("/api/ping/")
    assert response.status_code == 429
    assert response["Content-Type"] == "application/json"
    assert response["Retry-After"] == "45"
    assert limit_headers(response) == (3, 0, 45)
    error = response.json()["error"]
    assert (error["code"], error["retry_after"]) == ("rate_limited", 45)
    assert "at most 3 per 60 s" in error["message"]


def test_a_refused_request_spends_no_budget(client, clock):
    statuses(client, 3)
    assert statuses(client, 5) == [429] * 5
    clock.advance(60)
    assert statuses(client, 4) == [200, 200, 200, 429]


def test_reads_and_writes_have_separate_budgets(client):
    assert [client.post("/api/things/").status_code for _ in range(3)] == [201, 201, 429]
    assert statuses(client, 3) == [200, 200, 200]


def test_the_first_matching_group_counts_a_request(settings, client):
    settings.RESILIENCE_RATE_LIMITS = {
        "ping": {"paths": ["/api/ping/"], "limit": 1, "window_s": 60},
        "api": {"paths": ["/api/"], "limit": 5, "window_s": 60},
    }
    assert statuses(client, 2) == [200, 429]
    assert limit_headers(client.post("/api/things/"))[:2] == (5, 4)


def test_two_addresses_do_not_share_a_budget(client):
    assert statuses(client, 4, REMOTE_ADDR="203.0.113.1") == [200, 200, 200, 429]
    assert statuses(client, 4, REMOTE_ADDR="203.0.113.2") == [200, 200, 200, 429]


def test_ipv6_clients_are_counted_per_64_network(client):
    assert statuses(client, 2, REMOTE_ADDR="2001:db8:1:2::1") == [200, 200]
    assert statuses(client, 2, REMOTE_ADDR="2001:db8:1:2:ffff::9") == [200, 429]
    assert statuses(client, 1, REMOTE_ADDR="2001:db8:1:3::1") == [200]


def make_token(username):
    return Token.objects.create(user=get_user_model().objects.create_user(username, password="x")).key


@pytest.mark.django_db
def test_each_api_token_has_its_own_budget_apart_from_the_address(client):
    first, second = make_token("first"), make_token("second")
    assert statuses(client, 4, HTTP_AUTHORIZATION=f"Token {first}") == [200, 200, 200, 429]
    assert statuses(client, 4, HTTP_AUTHORIZATION=f"Token {second}") == [200, 200, 200, 429]
    assert statuses(client, 4) == [200, 200, 200, 429]


@pytest.mark.django_db
def test_a_made_up_or_inactive_users_token_spends_the_address_budget(client):
    inactive = make_token("gone")
    get_user_model().objects.filter(username="gone").update(is_active=False)
    assert statuses(client, 1, HTTP_AUTHORIZATION="Token made-up-1") == [200]
    assert statuses(client, 1, HTTP_AUTHORIZATION="Token made-up-2") == [200]
    assert statuses(client, 2, HTTP_AUTHORIZATION=f"Token {inactive}") == [200, 429]


@pytest.mark.django_db
@pytest.mark.parametrize("limits", [SMALL_LIMITS, {}], ids=["limits on", "limits off"])
def test_an_api_request_looks_its_token_up_once_whether_limited_or_not(settings, client, limits):
    settings.RESILIENCE_RATE_LIMITS = limits
    token = make_token("once")
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/api/whoami/", HTTP_AUTHORIZATION=f"Token {token}")
    assert response.status_code == 200 and response.json() == {"username": "once"}
    assert len(queries) == 1, [query["sql"] for query in queries]
    assert response.has_header("X-RateLimit-Limit") == bool(limits)


@pytest.mark.django_db
@pytest.mark.parametrize("limits", [SMALL_LIMITS, {}], ids=["limits on", "limits off"])
def test_the_api_refuses_a_bad_token_as_drf_does_whether_limited_or_not(settings, client, limits):
    settings.RESILIENCE_RATE_LIMITS = limits
    inactive = make_token("inactive")
    get_user_model().objects.filter(username="inactive").update(is_active=False)
    made_up = client.get("/api/whoami/", HTTP_AUTHORIZATION="Token made-up")
    gone = client.get("/api/whoami/", HTTP_AUTHORIZATION=f"Token {inactive}")
    assert (made_up.status_code, made_up.json()["error"]["message"]) == (401, "Invalid token.")
    assert (gone.status_code, gone.json()["error"]["message"]) == (401, "User inactive or deleted.")


@pytest.mark.django_db
def test_a_logged_in_user_has_a_budget_of_their_own(client):
    anonymous = Client()
    client.force_login(get_user_model().objects.create_user("operator", password="x"))
    assert statuses(client, 4) == [200, 200, 200, 429]
    assert statuses(anonymous, 1) == [200]


class RecordingLimiter(LocalRateLimiter):
    def __init__(self, clock):
        super().__init__(clock)
        self.keys = []

    def hit(self, key, limit, window_s):
        self.keys.append(key)
        return super().hit(key, limit, window_s)


def store_with(limiter, clock):
    """A per-process store whose rate limiter is ``limiter``."""
    store = LocalStore(clock)
    store.rate_limiter = limiter
    return store


@pytest.mark.django_db
def test_a_token_is_hashed_before_it_becomes_part_of_a_key(client, clock):
    token = make_token("keyholder")
    recording = RecordingLimiter(clock)
    with use_engine(Engine(store=store_with(recording, clock), clock=clock)):
        client.get("/api/ping/", HTTP_AUTHORIZATION=f"Token {token}")
    assert recording.keys == [f"api_read:token:{hashlib.sha256(token.encode()).hexdigest()}"]


def test_the_window_slides_instead_of_resetting_on_the_minute(settings, client, clock):
    settings.RESILIENCE_RATE_LIMITS = {"ping": {"paths": ["/api/ping/"], "limit": 2, "window_s": 10}}
    assert statuses(client, 1) == [200]                      # t = 0
    clock.advance(5)
    assert limit_headers(client.get("/api/ping/")) == (2, 0, 5)  # t = 5: the first leaves at 10
    clock.advance(1)
    assert limit_headers(client.get("/api/ping/")) == (2, 0, 4)  # t = 6: refused
    clock.advance(4.001)
    response = client.get("/api/ping/")                      # t = 10.001: only the first has left
    assert (response.status_code, limit_headers(response)) == (200, (2, 0, 5))
    clock.advance(1)
    assert client.get("/api/ping/").status_code == 429      # t = 11: the one from t = 5 still counts


@pytest.mark.django_db
def test_pages_outside_the_api_are_limited_without_rate_limit_headers(client):
    responses = [client.post("/admin/login/", {"username": "a", "password": "b"}) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert not any(r.has_header("X-RateLimit-Limit") for r in responses)
    assert responses[-1].json()["error"]["code"] == "rate_limited"
    assert responses[-1]["Retry-After"] == "60"


def test_health_and_metrics_are_never_limited_even_under_a_catch_all_group(settings, client):
    settings.RESILIENCE_RATE_LIMITS = {"everything": {"paths": ["/"], "limit": 1, "window_s": 60}}
    for path in ("/api/health/", "/metrics"):
        responses = [client.get(path) for _ in range(5)]
        assert [r.status_code for r in responses] == [200] * 5
        assert not any(r.has_header("X-RateLimit-Limit") for r in responses)
    assert statuses(client, 2) == [200, 429]


def test_requests_no_group_matches_are_not_counted(client):
    assert statuses(client, 10, path="/admin/login/") == [200] * 10
    assert client.get("/api/ping/").has_header("X-RateLimit-Limit")
    assert not client.get("/admin/login/").has_header("X-RateLimit-Limit")


# -- the client's address behind proxies -----------------------------------------------------


@pytest.mark.parametrize("remote_addr, forwarded_for, client", [
    ("203.0.113.7", "198.51.100.1", "203.0.113.7"),                 # an untrusted peer's header is ignored
    (PROXY, "203.0.113.7", "203.0.113.7"),
    (PROXY, "6.6.6.6, 203.0.113.7, 10.0.0.2", "203.0.113.7"),       # left of the client: the client's own words
    (PROXY, "", PROXY),                                             # the proxy itself is the client
    (PROXY, "10.0.0.3, 10.0.0.2", "10.0.0.3"),                      # every hop trusted: the farthest
    (PROXY, "203.0.113.7, unknown", PROXY),                         # not an address: stop at the last checked
    ("::ffff:203.0.113.7", "", "203.0.113.7"),                      # IPv4 reported by a dual-stack server
    ("", "203.0.113.7", None),
])
def test_the_client_address_is_the_right_most_hop_not_a_trusted_proxy(remote_addr, forwarded_for, client):
    request = RequestFactory().get("/", REMOTE_ADDR=remote_addr, HTTP_X_FORWARDED_FOR=forwarded_for)
    found = client_ip(request, tuple(map(ipaddress.ip_network, TRUSTED_PROXIES)))
    assert (str(found) if found is not None else None) == client


def test_a_spoofed_forwarded_for_from_an_untrusted_peer_does_not_buy_a_new_budget(client):
    spoofs = [{"HTTP_X_FORWARDED_FOR": f"198.51.100.{n}"} for n in range(4)]
    assert [client.get("/api/ping/", **spoof).status_code for spoof in spoofs] == [200, 200, 200, 429]


def test_clients_behind_a_trusted_proxy_have_their_own_budgets(settings, client):
    settings.RESILIENCE_TRUSTED_PROXIES = TRUSTED_PROXIES
    behind = {"REMOTE_ADDR": PROXY}
    assert statuses(client, 4, HTTP_X_FORWARDED_FOR="203.0.113.1", **behind) == [200, 200, 200, 429]
    assert statuses(client, 1, HTTP_X_FORWARDED_FOR="203.0.113.2", **behind) == [200]
    assert statuses(client, 1, HTTP_X_FORWARDED_FOR="203.0.113.1, 10.0.0.9", **behind) == [429]


# -- the admin allowlist ---------------------------------------------------------------------


@pytest.fixture
def allowlist(settings):
    settings.RESILIENCE_ADMIN_ALLOWED_IPS = ["192.0.2.0/24", "2001:db8:a::/48"]
    settings.RESILIENCE_TRUSTED_PROXIES = TRUSTED_PROXIES


@pytest.mark.parametrize("address", ["192.0.2.10", "192.0.2.255", "2001:db8:a:1::5"])
def test_the_admin_answers_addresses_in_the_allowlist(allowlist, client, address):
    response = client.get("/admin/login/", REMOTE_ADDR=address)
    assert response.status_code == 200
    assert b'name="username"' in response.content


@pytest.mark.parametrize("path", ["/admin/", "/admin/login/", "/admin/auth/user/"])
@pytest.mark.parametrize("address", ["192.0.3.1", "2001:db8:b::1", "127.0.0.1"])
def test_the_admin_refuses_other_addresses_with_a_plain_403(allowlist, client, path, address):
    response = client.get(path, REMOTE_ADDR=address)
    assert response.status_code == 403
    assert response["Content-Type"] == "text/html; charset=utf-8"
    assert b"cannot be reached from your address" in response.content
    assert b"username" not in response.content


def test_a_refused_admin_login_spends_no_rate_limit_budget(allowlist, client, clock):
    recording = RecordingLimiter(clock)
    with use_engine(Engine(store=store_with(recording, clock), clock=clock)):
        refused = [client.post("/admin/login/", {"username": "a"}, REMOTE_ADDR="192.0.3.1") for _ in range(3)]
    assert [r.status_code for r in refused] == [403, 403, 403]
    assert recording.keys == []


def test_the_allowlist_believes_forwarded_for_only_from_a_trusted_proxy(allowlist, client):
    assert client.get("/admin/login/", REMOTE_ADDR="198.51.100.1",
                      HTTP_X_FORWARDED_FOR="192.0.2.10").status_code == 403
    assert client.get("/admin/login/", REMOTE_ADDR=PROXY,
                      HTTP_X_FORWARDED_FOR="192.0.2.10").status_code == 200
    assert client.get("/admin/login/", REMOTE_ADDR=PROXY,
                      HTTP_X_FORWARDED_FOR="192.0.2.10, 198.51.100.1").status_code == 403


def test_the_allowlist_leaves_the_api_alone(allowlist, client):
    assert client.get("/api/ping/", REMOTE_ADDR="198.51.100.1").status_code == 200


def test_an_empty_allowlist_lets_any_address_reach_the_admin(client):
    assert client.get("/admin/login/", REMOTE_ADDR="198.51.100.1").status_code == 200


# -- security headers ------------------------------------------------------------------------


def test_every_response_carries_the_security_headers(settings, client):
    responses = [client.get("/api/ping/"), client.get("/nowhere/"), client.get("/admin/login/")]
    statuses(client, 2)
    responses.append(client.get("/api/ping/"))
    assert [r.status_code for r in responses] == [200, 404, 200, 429]
    for response in responses:
        assert response["Content-Security-Policy"] == app_settings.CONTENT_SECURITY_POLICY
        assert response["X-Content-Type-Options"] == "nosniff"
        assert response["X-Frame-Options"] == "DENY"
        assert response["Referrer-Policy"] == "same-origin"


def test_a_response_with_its_own_policy_keeps_it(rf):
    own = "default-src 'none'"
    middleware = ContentSecurityPolicyMiddleware(lambda request: HttpResponse(headers={"Content-Security-Policy": own}))
    assert middleware(rf.get("/"))["Content-Security-Policy"] == own


class InlineCodeFinder(HTMLParser):
    """What a page would need beyond the default policy: inline scripts, <style> blocks, event handler
    attributes, javascript: URLs, or scripts, styles, images and form targets on another origin."""

    EXTERNAL_ATTRIBUTES = {("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src"),
                           ("form", "action")}

    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "script" and not attributes.get("src") and attributes.get("type") != "application/json":
            self.found.append(f"inline <script> {attributes}")
        if tag == "style":
            self.found.append("<style> block")
        for name, value in attributes.items():
            value = (value or "").strip()
            if name.startswith("on"):
                self.found.append(f"<{tag} {name}=...>")
            if value.lower().startswith("javascript:"):
                self.found.append(f"<{tag} {name}={value}>")
            if (tag, name) in self.EXTERNAL_ATTRIBUTES and urlsplit(value).netloc not in ("", "testserver"):
                self.found.append(f"<{tag} {name}={value}>")


def needs_beyond_policy(html: str) -> list[str]:
    finder = InlineCodeFinder()
    finder.feed(html)
    return finder.found


@pytest.mark.django_db
def test_the_admin_pages_need_nothing_the_policy_forbids(client, admin_client, admin_user):
    pages = {"/admin/login/": client.get("/admin/login/")}
    for path in ("/admin/", "/admin/auth/user/", "/admin/auth/user/add/", f"/admin/auth/user/{admin_user.pk}/change/",
                 "/admin/auth/group/add/", "/admin/password_change/"):
        pages[path] = admin_client.get(path)
    assert {path: response.status_code for path, response in pages.items()} == dict.fromkeys(pages, 200)
    assert {path: needs_beyond_policy(response.content.decode()) for path, response in pages.items()} == \
        dict.fromkeys(pages, [])


def test_the_finder_catches_what_the_policy_would_block():
    page = ('<script>alert(1)</script><style>p{}</style><a href="javascript:go()" onclick="go()">x</a>'
            '<script src="https://cdn.example/x.js"></script><script type="application/json">{}</script>'
            '<p style="color: red">allowed</p>')
    assert len(needs_beyond_policy(page)) == 5


def production_env():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "resilience_site.settings", "DEBUG": "0",
           "SECRET_KEY": secrets.token_urlsafe(60), "ALLOWED_HOSTS": "example.com"}
    env.pop("SECURE_SSL_REDIRECT", None)
    return env


def test_check_deploy_is_clean_under_production_settings():
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            cwd=ROOT, env=production_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


PRODUCTION_PROBE = """
import json
import django
django.setup()
from django.test import Client
response = Client(HTTP_HOST="example.com").get("/admin/login/", secure=True)
print(json.dumps({"status": response.status_code, "headers": dict(response.headers)}))
"""


def test_production_responses_carry_hsts_and_the_other_security_headers():
    result = subprocess.run([sys.executable, "-c", PRODUCTION_PROBE], cwd=ROOT, env=production_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    headers = probe["headers"]
    assert probe["status"] == 200
    assert headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "same-origin"
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


# -- failing open ----------------------------------------------------------------------------


def test_requests_go_through_when_redis_cannot_be_reached(settings, client, clock):
    unreachable = RedisStore("redis://127.0.0.1:1/0", prefix=settings.RESILIENCE_KEY_PREFIX, clock=clock,
                             bus=EventBus(), socket_timeout_s=0.2)
    with use_engine(Engine(store=unreachable, clock=clock)):
        responses = [client.get("/api/ping/") for _ in range(4)]
    assert not unreachable.available
    # counted per process meanwhile, as the store falls back
    assert [(r.status_code, r["X-RateLimit-Remaining"]) for r in responses] == \
        [(200, "2"), (200, "1"), (200, "0"), (429, "0")]


def test_the_limiter_shares_the_stores_redis_client_and_its_outage(settings, clock, caplog):
    unreachable = RedisStore("redis://127.0.0.1:1/0", prefix=settings.RESILIENCE_KEY_PREFIX, clock=clock,
                             bus=EventBus(), socket_timeout_s=0.2)
    assert unreachable.rate_limiter.link.client is unreachable.client  # one connection pool per process
    assert unreachable.rate_limiter.hit("outage", 5, 60).allowed
    assert unreachable.acquire(Policy(name="svc")).allowed  # per process too, without asking Redis again
    warnings = [r for r in caplog.records if r.name == "integrations.shared_state"]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()


class BrokenLimiter(LocalRateLimiter):
    def hit(self, key, limit, window_s):
        raise RuntimeError("a bug in the limiter")


def test_a_fault_in_the_limiter_lets_the_request_through_and_is_logged(client, clock, caplog):
    with use_engine(Engine(store=store_with(BrokenLimiter(clock), clock), clock=clock)):
        response = client.get("/api/ping/")
    assert response.status_code == 200
    assert not response.has_header("X-RateLimit-Limit")
    (record,) = [r for r in caplog.records if r.name == "integrations.inbound"]
    assert "'api_read' not applied to GET /api/ping/" in record.getMessage()
    assert record.exc_info[0] is RuntimeError


# -- one limit for the fleet, in Redis ---------------------------------------------------------


def redis_engine(prefix):
    return Engine(store=RedisStore(redis_url(), prefix=prefix, bus=EventBus()))


@pytest.mark.skipif(not redis_url(), reason=NEEDS_REDIS)
@pytest.mark.django_db
def test_in_redis_a_token_never_appears_in_a_key(settings, client):
    token = make_token("redis-keyholder")
    engine = redis_engine(settings.RESILIENCE_KEY_PREFIX)
    with use_engine(engine):
        assert statuses(client, 1, HTTP_AUTHORIZATION=f"Token {token}") == [200]
    keys = [key.decode() for key in engine.store.client.scan_iter(f"{settings.RESILIENCE_KEY_PREFIX}:*")]
    assert keys == [f"{settings.RESILIENCE_KEY_PREFIX}:ratelimit:api_read:token:"
                    f"{hashlib.sha256(token.encode()).hexdigest()}"]


def requests_in_another_worker(prefix, count, path, results):
    """A forked process with its own engine and store, as a second gunicorn worker would have."""
    with use_engine(redis_engine(prefix)):
        results.put(statuses(Client(), count, path))


def statuses_in_another_worker(prefix, count, path="/api/ping/"):
    """The statuses of ``count`` requests for ``path`` made by another process on the Redis store at ``prefix``."""
    results = FORK.Queue()
    worker = FORK.Process(target=requests_in_another_worker, args=(prefix, count, path, results))
    worker.start()
    answered = results.get(timeout=30)
    worker.join(30)
    assert worker.exitcode == 0
    return answered


@pytest.mark.skipif(not redis_url(), reason=NEEDS_REDIS)
def test_two_worker_processes_share_one_limit_in_redis(settings, client):
    other_worker_statuses = statuses_in_another_worker(settings.RESILIENCE_KEY_PREFIX, 2)
    with use_engine(redis_engine(settings.RESILIENCE_KEY_PREFIX)):
        responses = [client.get("/api/ping/") for _ in range(2)]
    assert other_worker_statuses == [200, 200]
    assert [(r.status_code, r["X-RateLimit-Remaining"]) for r in responses] == [(200, "0"), (429, "0")]


@pytest.mark.skipif(not redis_url(), reason=NEEDS_REDIS)
def test_two_stores_in_one_process_share_one_limit_in_redis(settings):
    first, second = (RedisStore(redis_url(), prefix=settings.RESILIENCE_KEY_PREFIX, bus=EventBus()) for _ in "12")
    verdicts = [store.rate_limiter.hit("shared", 4, 60).allowed for _ in range(3) for store in (first, second)]
    assert verdicts == [True, True, True, True, False, False]
