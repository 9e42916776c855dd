"""The integrations, quotas and cache endpoints of the HTTP API: content, permissions, paging, filters, errors."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from api_support import client_for, clients, error_of, no_rate_limits  # noqa: F401 - autouse fixture
from integrations.models import BreakerEvent, Integration
from integrations.resilience import execute, get_engine
from monitoring.models import CallStats

pytestmark = pytest.mark.django_db

CHANGE = "change_integration"


@pytest.fixture
def billing():
    # one failure opens the breaker, and no retry waits
    return Integration.objects.create(name="billing", kind="external_api", failure_threshold=1, max_retries=0,
                                      hourly_limit=10, cache_ttl_s=60, timeout_enforcement="inline")


@pytest.fixture
def fleet(billing):
    return {"billing": billing,
            "ledger": Integration.objects.create(name="ledger", kind="database"),
            "prices": Integration.objects.create(name="prices", kind="market_data")}


@pytest.fixture
def viewer():
    return client_for("viewer")


@pytest.fixture
def operator():
    return client_for("operator", perms=(CHANGE,))


def fail():
    raise ConnectionError("upstream down")


def trip(integration):
    assert not execute(integration.name, fail).ok
    assert integration.breaker_snapshot().state == "open"


def minute_ago(minutes=0):
    return timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=minutes)


# -- GET /api/integrations/ ------------------------------------------------------------------------

def test_the_list_shows_each_integrations_live_breaker_quota_and_last_hours_statistics(viewer, fleet):
    # 10 calls in the 50-100 ms bucket this minute, 8 successes; an older row is outside the hour
    CallStats.objects.create(integration=fleet["billing"], minute=minute_ago(), calls=10, successes=8,
                             failures_timeout=2, attempts=10, latency_le_100=10, latency_sum_ms=800.0)
    CallStats.objects.create(integration=fleet["billing"], minute=minute_ago(90), calls=50, successes=50)
    trip(fleet["billing"])
    body = viewer.get("/api/integrations/").json()
    assert body["count"] == 3 and [row["name"] for row in body["results"]] == ["billing", "ledger", "prices"]
    billing = body["results"][0]
    assert billing["kind"] == "external_api"
    assert billing["breaker"]["state"] == billing["breaker"]["own_state"] == "open"
    assert billing["breaker"]["scope"] == ("shared" if get_engine().store.shared else "process")
    assert billing["breaker"]["recorded"]["state"] == "open"
    assert billing["quota"]["hourly"]["limit"] == 10 and billing["quota"]["level"] in ("healthy", "warning")
    stats = billing["stats"]
    assert (stats["window_minutes"], stats["calls"], stats["successes"], stats["errors"]) == (60, 10, 8, 2)
    assert stats["success_rate"] == 0.8
    assert (stats["latency_p50_ms"], stats["latency_p95_ms"], stats["latency_p99_ms"]) == (75.0, 97.5, 99.5)
    assert stats["failures_by_category"] == {"timeout": 2}
    ledger = body["results"][1]
    assert ledger["stats"]["calls"] == 0 and ledger["stats"]["success_rate"] is None
    assert ledger["breaker"]["state"] == "closed" and ledger["breaker"]["recorded"] is None


def test_a_forced_mode_is_the_state_callers_get(viewer, fleet):
    fleet["ledger"].force_open()
    ledger = viewer.get("/api/integrations/ledger/").json()["breaker"]
    assert (ledger["state"], ledger["own_state"], ledger["mode"]) == ("open", "closed", "forced_open")


def test_the_list_filters_by_kind_mode_and_live_state(viewer, fleet):
    trip(fleet["billing"])
    fleet["prices"].force_closed()

    def names(query):
        return [row["name"] for row in viewer.get("/api/integrations/", query).json()["results"]]

    assert names({"kind": "database"}) == ["ledger"]
    assert names({"mode": "forced_closed"}) == ["prices"]
    assert names({"state": "open"}) == ["billing"]
    assert names({"state": "closed"}) == ["ledger", "prices"]
    assert names({"state": "half_open"}) == []
    assert names({"kind": "market_data", "state": "closed"}) == ["prices"]


def test_the_list_is_paged_and_page_size_is_the_clients_choice_up_to_1000(viewer, fleet):
    first = viewer.get("/api/integrations/", {"page_size": 2}).json()
    assert (first["count"], len(first["results"]), first["previous"]) == (3, 2, None)
    assert "page=2" in first["next"] and "page_size=2" in first["next"]
    second = viewer.get("/api/integrations/", {"page_size": 2, "page": 2}).json()
    assert [row["name"] for row in second["results"]] == ["prices"] and second["next"] is None
    assert len(viewer.get("/api/integrations/", {"page_size": 1000}).json()["results"]) == 3
    assert viewer.get("/api/integrations/", {"limit": 2}).json()["results"] == first["results"]  # limit: the same


@pytest.mark.parametrize("query, field", [
    ({"kind": "mainframe"}, "kind"), ({"state": "ajar"}, "state"), ({"mode": "loud"}, "mode"),
    ({"page_size": "0"}, "page_size"), ({"page_size": "1001"}, "page_size"), ({"page_size": "many"}, "page_size"),
    ({"page": "0"}, "page"), ({"page": "first"}, "page"),
])
def test_bad_list_parameters_are_400_naming_the_field(viewer, fleet, query, field):
    error = error_of(viewer.get("/api/integrations/", query), 400)
    assert (error["code"], list(error["fields"])) == ("invalid", [field])
    assert error["message"].startswith(f"{field}: ")


def test_a_page_past_the_last_is_404(viewer, fleet):
    assert error_of(viewer.get("/api/integrations/", {"page": 9}), 404)["code"] == "not_found"


# -- GET /api/integrations/{name}/ -----------------------------------------------------------------

def test_the_detail_adds_the_policy_and_the_recent_breaker_events(viewer, billing):
    trip(billing)
    body = viewer.get("/api/integrations/billing/").json()
    assert body["policy"]["failure_threshold"] == 1 and body["policy"]["hourly_limit"] == 10
    assert set(body["policy"]) >= {"mode", "max_retries", "timeout_ms", "capacity", "cache_ttl_s"}
    assert [(event["from_state"], event["to_state"]) for event in body["events"]] == [("closed", "open")]
    assert body["fault_injection"] is None


def test_the_detail_shows_a_fault_injection_in_force(viewer, billing, settings):
    settings.RESILIENCE_FAULT_INJECTION = True
    injection = billing.inject_fault(error_percent=25, latency_ms=200, minutes=10, by="gameday")
    fault = viewer.get("/api/integrations/billing/").json()["fault_injection"]
    assert fault == {"error_percent": 25.0, "latency_ms": 200, "until": injection.ends_at.isoformat()}


def test_an_unknown_name_is_404_naming_it(viewer):
    error = error_of(viewer.get("/api/integrations/nope/"), 404)
    assert (error["code"], error["message"]) == ("not_found", 'No integration is named "nope".')


@pytest.mark.parametrize("method, url", [
    ("get", "/api/integrations/bill%00ing/"), ("post", "/api/integrations/bill%00ing/breaker/reset/"),
    ("delete", "/api/cache/bill%00ing/"), ("get", f"/api/integrations/{'x' * 101}/"),
])
def test_a_name_no_integration_can_have_is_404_too(operator, billing, method, url):
    # (PostgreSQL refuses a NUL byte in a query: such a name must never reach the database)
    assert error_of(getattr(operator, method)(url), 404)["code"] == "not_found"


# -- POST /api/integrations/{name}/breaker/{reset,open,close}/ -------------------------------------

def test_reset_closes_a_tripped_breaker_and_the_history_names_the_operator(operator, billing):
    trip(billing)
    response = operator.post("/api/integrations/billing/breaker/reset/")
    assert response.status_code == 200
    body = response.json()
    assert (body["integration"], body["action"], body["breaker"]["state"]) == ("billing", "reset", "closed")
    assert (body["event"]["from_state"], body["event"]["to_state"], body["event"]["by"]) == ("open", "closed",
                                                                                             "operator")
    assert billing.breaker_events.filter(to_state="closed", by="operator").exists()
    assert billing.breaker_snapshot().state == "closed"


def test_force_open_and_close_set_the_mode_and_are_recorded(operator, billing):
    opened = operator.post("/api/integrations/billing/breaker/open/").json()
    assert (opened["breaker"]["state"], opened["breaker"]["mode"]) == ("open", "forced_open")
    assert opened["event"]["reason"] == "forced open: mode normal -> forced_open"
    assert not execute("billing", lambda: "called").ok  # callers are refused
    closed = operator.post("/api/integrations/billing/breaker/close/").json()
    assert (closed["breaker"]["state"], closed["breaker"]["mode"]) == ("closed", "forced_closed")
    reset = operator.post("/api/integrations/billing/breaker/reset/").json()
    assert reset["breaker"]["mode"] == "normal"
    assert list(BreakerEvent.objects.values_list("by", flat=True)) == ["operator"] * 3


def test_an_unknown_action_or_integration_is_404(operator, billing):
    assert error_of(operator.post("/api/integrations/billing/breaker/explode/"), 404)["code"] == "not_found"
    error = error_of(operator.post("/api/integrations/nope/breaker/reset/"), 404)
    assert error["message"] == 'No integration is named "nope".'


def test_a_method_the_endpoint_does_not_have_is_405(operator, billing):
    error = error_of(operator.get("/api/integrations/billing/breaker/reset/"), 405)
    assert (error["code"], error["message"]) == ("method_not_allowed", 'Method "GET" not allowed.')
    assert error_of(operator.put("/api/integrations/", {}), 405)["code"] == "method_not_allowed"


# -- GET /api/quotas/ -----------------------------------------------------------------------------

def test_quotas_show_each_windows_usage_and_filter_by_level(viewer, fleet):
    for _ in range(8):
        assert execute("billing", lambda: "ok").ok
    body = viewer.get("/api/quotas/").json()
    assert body["count"] == 3
    billing = body["results"][0]
    assert (billing["integration"], billing["level"]) == ("billing", "warning")
    assert (billing["hourly"]["used"], billing["hourly"]["limit"], billing["hourly"]["ratio"]) == (8, 10, 0.8)
    assert billing["daily"]["limit"] is None and billing["hourly"]["resets_at"].endswith("+00:00")
    warning = viewer.get("/api/quotas/", {"level": "warning"}).json()
    assert [row["integration"] for row in warning["results"]] == ["billing"]
    assert error_of(viewer.get("/api/quotas/", {"level": "red"}), 400)["fields"] == {
        "level": ['"red" is not a valid choice.']}


# -- GET /api/cache/stats/ and DELETE /api/cache/{name}/ -------------------------------------------

def test_cache_stats_count_this_process_and_the_fleets_last_hour(viewer, billing):
    assert execute("billing", lambda: "fresh", cache_key="k").source == "live"
    assert execute("billing", lambda: "fresh", cache_key="k").source == "cache"
    CallStats.objects.create(integration=billing, minute=minute_ago(), calls=4, successes=4, cache_hits=3,
                             cache_misses=1)
    (row,) = viewer.get("/api/cache/stats/").json()["results"]
    assert (row["integration"], row["ttl_s"], row["version"]) == ("billing", 60, 0)
    process = dict(row["process"])
    assert 0 <= process.pop("average_age_s") < 60  # the one entry, younger than its TTL
    assert process == {"hits": 1, "misses": 1, "hit_ratio": 0.5, "entries": 1}  # the entry in this process's L1
    assert row["window"] == {"minutes": 60, "hits": 3, "misses": 1, "hit_ratio": 0.75}


def test_clearing_a_cache_makes_old_entries_unreachable(operator, billing, django_capture_on_commit_callbacks):
    execute("billing", lambda: "old", cache_key="k")
    with django_capture_on_commit_callbacks(execute=True):  # the engine reloads the policy after commit
        response = operator.delete("/api/cache/billing/")
    assert (response.status_code, response.json()) == (200, {"integration": "billing", "version": 1, "scope": "all",
                                                             "generation": 1})
    assert execute("billing", lambda: "new", cache_key="k").value == "new"
    assert error_of(operator.delete("/api/cache/nope/"), 404)["message"] == 'No integration is named "nope".'


def test_a_misspelt_clear_parameter_is_a_400_naming_it_and_clears_nothing(operator, billing,
                                                                           django_capture_on_commit_callbacks):
    execute("billing", lambda: "old", cache_key="k")
    with django_capture_on_commit_callbacks(execute=True):
        error = error_of(operator.delete("/api/cache/billing/?kye=k"), 400)
    assert error["fields"] == {"kye": ["Unknown parameter; expected one of: format, key, prefix."]}
    assert Integration.objects.get(name="billing").cache_version == 0
    assert execute("billing", lambda: "new", cache_key="k").value == "old"  # still served from the cache


def test_a_misspelt_list_filter_is_a_400_naming_it_while_paging_and_format_pass(viewer, fleet):
    error = error_of(viewer.get("/api/integrations/", {"knid": "database"}), 400)
    assert list(error["fields"]) == ["knid"] and "kind" in error["fields"]["knid"][0]
    assert viewer.get("/api/integrations/", {"kind": "database", "page_size": 1, "page": 1, "format": "json"}).status_code == 200
    assert list(error_of(viewer.get("/api/quotas/", {"lvl": "ok"}), 400)["fields"]) == ["lvl"]


# -- who may do what ------------------------------------------------------------------------------

READS = ["/api/integrations/", "/api/integrations/billing/", "/api/quotas/", "/api/cache/stats/"]
ACTIONS = [("post", "/api/integrations/billing/breaker/reset/"), ("post", "/api/integrations/billing/breaker/open/"),
           ("post", "/api/integrations/billing/breaker/close/"), ("delete", "/api/cache/billing/")]


@pytest.mark.parametrize("url", READS)
def test_reads_need_a_staff_user(billing, url):
    users = clients(CHANGE)
    assert error_of(users["anonymous"].get(url), 401)["code"] == "not_authenticated"
    assert users["anonymous"].get(url)["WWW-Authenticate"] == "Token"
    assert error_of(users["member"].get(url), 403)["code"] == "permission_denied"
    assert users["viewer"].get(url).status_code == 200
    assert users["operator"].get(url).status_code == 200


@pytest.mark.parametrize("method, url", ACTIONS)
def test_actions_need_integrations_change_integration(billing, method, url):
    users = clients(CHANGE)
    assert error_of(getattr(users["anonymous"], method)(url), 401)["code"] == "not_authenticated"
    assert error_of(getattr(users["member"], method)(url), 403)["code"] == "permission_denied"
    error = error_of(getattr(users["viewer"], method)(url), 403)
    assert error["message"] == "This needs the permission integrations.change_integration."
    assert getattr(users["operator"], method)(url).status_code == 200


def test_the_delete_permission_alone_does_not_clear_a_cache(billing):
    deleter = client_for("deleter", perms=("delete_integration",))
    assert error_of(deleter.delete("/api/cache/billing/"), 403)["message"] == (
        "This needs the permission integrations.change_integration.")


def test_token_authentication_works_for_reads_and_actions(billing):
    user = User.objects.create_user("robot", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename=CHANGE))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    assert client.get("/api/integrations/").status_code == 200
    response = client.post("/api/integrations/billing/breaker/open/")
    assert (response.status_code, response.json()["event"]["by"]) == (200, "robot")
    assert error_of(APIClient(HTTP_AUTHORIZATION="Token wrong").get("/api/integrations/"), 401)["code"] == (
        "authentication_failed")


def test_the_breaker_window_says_what_its_rates_are_measured_over(viewer):
    Integration.objects.create(name="timed", window_type="time", window_duration_s=120, failure_threshold=100,
                               max_retries=0, timeout_enforcement="inline")
    Integration.objects.create(name="counted", window_size=30, timeout_enforcement="inline")
    execute("timed", fail)
    execute("timed", lambda: 1)
    timed = viewer.get("/api/integrations/timed/").json()
    assert timed["breaker"]["window"] == {"type": "time", "size": None, "duration_s": 120, "calls": 2,
                                          "failures": 1, "slow": 0, "retries": 0, "failure_rate": 50.0}
    assert (timed["policy"]["window_type"], timed["policy"]["window_duration_s"]) == ("time", 120)
    counted = viewer.get("/api/integrations/counted/").json()["breaker"]["window"]
    assert (counted["type"], counted["size"], counted["duration_s"]) == ("count", 30, None)
