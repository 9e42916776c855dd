"""The alerts, watchdog and metrics endpoints of the HTTP API: content, permissions, paging, filters, errors."""

from datetime import timedelta

import pytest
from django.utils import timezone

from api_support import client_for, clients, error_of
from integrations.models import Integration
from monitoring.models import CRITICAL, WARNING, Alert, CallStats

pytestmark = pytest.mark.django_db

CHANGE = "change_alert"


@pytest.fixture(autouse=True)
def no_rate_limits(settings):
    settings.RESILIENCE_RATE_LIMITS = {}


@pytest.fixture
def viewer():
    return client_for("viewer")


@pytest.fixture
def operator():
    return client_for("operator", perms=(CHANGE,))


@pytest.fixture
def billing():
    return Integration.objects.create(name="billing")


@pytest.fixture
def alerts(billing):
    now = timezone.now()
    spike, _ = Alert.raise_or_update(Alert.ERROR_SPIKE, CRITICAL, "80% of calls failed", integration=billing,
                                     now=now - timedelta(minutes=3))
    slow, _ = Alert.raise_or_update(Alert.SLOW_CALLS, WARNING, "slow", integration=billing,
                                    now=now - timedelta(minutes=2))
    backlog, _ = Alert.raise_or_update(Alert.DLQ_BACKLOG, WARNING, "dead letters waiting",
                                       now=now - timedelta(minutes=1))
    old, _ = Alert.raise_or_update(Alert.QUOTA, WARNING, "quota", integration=billing, now=now - timedelta(hours=1))
    old.resolve("condition cleared")
    slow.acknowledge(None)
    return {"spike": spike, "slow": slow, "backlog": backlog, "old": old}


def minute_ago(minutes=0):
    return timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=minutes)


def ids(response):
    assert response.status_code == 200, response.content
    return [alert["id"] for alert in response.json()["results"]]


# -- GET /api/alerts/ --------------------------------------------------------------------------------

def test_alerts_are_listed_most_recently_seen_first(viewer, alerts):
    body = viewer.get("/api/alerts/").json()
    assert body["count"] == 4
    assert [alert["id"] for alert in body["results"]] == [alerts[k].pk for k in ("backlog", "slow", "spike", "old")]
    spike = body["results"][2]
    assert spike == {**alerts["spike"].as_dict(), **{k: spike[k] for k in ("first_seen", "last_seen")}}
    assert (spike["kind"], spike["severity"], spike["integration"], spike["status"]) == (
        "error_spike", "critical", "billing", "open")
    assert body["results"][0]["integration"] is None


@pytest.mark.parametrize("query, expected", [
    ({"active": "1"}, ("backlog", "slow", "spike")),
    ({"active": "true"}, ("backlog", "slow", "spike")),
    ({"active": "0"}, ("old",)),
    ({"severity": "critical"}, ("spike",)),
    ({"status": "acknowledged"}, ("slow",)),
    ({"kind": "dlq_backlog"}, ("backlog",)),
    ({"integration": "billing", "active": "1", "severity": "warning"}, ("slow",)),
    ({"integration": "nobody"}, ()),
])
def test_alerts_filter_by_activity_severity_status_kind_and_integration(viewer, alerts, query, expected):
    assert ids(viewer.get("/api/alerts/", query)) == [alerts[name].pk for name in expected]


def test_alerts_are_paged(viewer, alerts):
    body = viewer.get("/api/alerts/", {"page_size": 3, "page": 2}).json()
    assert (body["count"], [alert["id"] for alert in body["results"]]) == (4, [alerts["old"].pk])


@pytest.mark.parametrize("query, field", [
    ({"active": "maybe"}, "active"), ({"severity": "dire"}, "severity"), ({"status": "gone"}, "status"),
    ({"kind": "weird"}, "kind"), ({"page_size": "-1"}, "page_size"), ({"sevrity": "critical"}, "sevrity"),
])
def test_bad_alert_filters_are_400_naming_the_field(viewer, alerts, query, field):
    error = error_of(viewer.get("/api/alerts/", query), 400)
    assert list(error["fields"]) == [field]


# -- POST /api/alerts/{id}/acknowledge/ and /resolve/ ---------------------------------------------------

def test_acknowledging_records_who_and_only_open_alerts_can_be(operator, alerts):
    response = operator.post(f"/api/alerts/{alerts['spike'].pk}/acknowledge/")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["acknowledged_by"]) == ("acknowledged", "operator")
    alerts["spike"].refresh_from_db()
    assert alerts["spike"].acknowledged_by.username == "operator"
    again = error_of(operator.post(f"/api/alerts/{alerts['spike'].pk}/acknowledge/"), 409)
    assert (again["code"], again["message"]) == (
        "conflict", f"Alert {alerts['spike'].pk} is acknowledged: only an open alert can be acknowledged.")
    assert error_of(operator.post(f"/api/alerts/{alerts['old'].pk}/acknowledge/"), 409)["code"] == "conflict"


def test_resolving_records_the_reason_and_who(operator, alerts, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = operator.post(f"/api/alerts/{alerts['slow'].pk}/resolve/", {"reason": "upstream fixed"},
                                 format="json")
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["resolution"]) == ("resolved", "upstream fixed (by operator)")
    default = operator.post(f"/api/alerts/{alerts['spike'].pk}/resolve/").json()
    assert default["resolution"] == "resolved by an operator (by operator)"
    error = error_of(operator.post(f"/api/alerts/{alerts['old'].pk}/resolve/"), 409)
    assert error["message"] == f"Alert {alerts['old'].pk} is already resolved."


@pytest.mark.parametrize("body", [{"reason": ""}, {"reason": "x" * 151}, {"reason": ["a"]}])
def test_a_bad_reason_is_400_naming_it(operator, alerts, body):
    error = error_of(operator.post(f"/api/alerts/{alerts['spike'].pk}/resolve/", body, format="json"), 400)
    assert list(error["fields"]) == ["reason"]
    assert Alert.objects.get(pk=alerts["spike"].pk).status == Alert.OPEN


@pytest.mark.parametrize("action", ["acknowledge", "resolve"])
@pytest.mark.parametrize("pk", ["999999", "99999999999999999999999"])  # the second overflows a bigint
def test_an_unknown_alert_is_404(operator, action, pk):
    error = error_of(operator.post(f"/api/alerts/{pk}/{action}/"), 404)
    assert (error["code"], error["message"]) == ("not_found", f"No alert has the id {pk}.")


def test_a_nul_byte_in_a_filter_is_400(viewer):
    error = error_of(viewer.get("/api/alerts/", {"integration": "bill\x00ing"}), 400)
    assert error["fields"] == {"integration": ["Null characters are not allowed."]}


# -- GET /api/watchdog/report/ and POST /api/watchdog/run/ --------------------------------------------

def test_the_report_lists_active_alerts_by_severity(viewer, alerts):
    report = viewer.get("/api/watchdog/report/").json()
    assert report["status"] == "critical"
    assert [alert["id"] for alert in report["critical"]] == [alerts["spike"].pk]
    assert sorted(alert["id"] for alert in report["warnings"]) == sorted([alerts["slow"].pk, alerts["backlog"].pk])


def test_a_run_raises_alerts_from_the_statistics_and_resolves_cleared_ones(operator, billing, alerts):
    # 30 calls, 25 of them failed, this minute: an error spike; the slow calls and backlog have cleared
    CallStats.objects.create(integration=billing, minute=minute_ago(), calls=30, successes=5, failures_server_error=25,
                             attempts=30, latency_le_10=30, latency_sum_ms=150.0)
    response = operator.post("/api/watchdog/run/")
    assert response.status_code == 200
    run = response.json()
    assert run["status"] == "critical"
    assert run["changes"]["repeated"] == [alerts["spike"].pk]
    assert sorted(run["changes"]["resolved"]) == sorted([alerts["slow"].pk, alerts["backlog"].pk])
    unavailable = Alert.objects.active().get(kind=Alert.UNAVAILABLE)
    assert run["changes"]["new"] == [unavailable.pk]
    assert {alert["kind"] for alert in run["critical"]} == {"error_spike", "unavailable"}


# -- GET /api/metrics/summary/ ----------------------------------------------------------------------

def test_the_summary_totals_the_fleet_over_the_window(viewer, billing, alerts):
    ledger = Integration.objects.create(name="ledger")
    CallStats.objects.create(integration=billing, minute=minute_ago(), calls=10, successes=6, failures_timeout=2,
                             rejected_open=2, attempts=8, cache_hits=1, cache_misses=3, latency_le_100=8)
    CallStats.objects.create(integration=ledger, minute=minute_ago(30), calls=10, successes=10, attempts=10,
                             latency_le_10=10)
    CallStats.objects.create(integration=ledger, minute=minute_ago(120), calls=100, successes=100)
    body = viewer.get("/api/metrics/summary/").json()
    assert body["window"]["minutes"] == 60
    totals = body["totals"]
    assert (totals["calls"], totals["successes"], totals["errors"], totals["rejected"]) == (20, 16, 2, 2)
    assert (totals["success_rate"], totals["cache_hit_ratio"]) == (0.8, 0.25)
    assert totals["error_rate"] == 2 / 18
    assert totals["failures_by_category"] == {"timeout": 2} and totals["rejected_by_reason"] == {"circuit_open": 2}
    assert totals["latency_p50_ms"] is not None
    assert [row["integration"] for row in body["by_integration"]] == ["billing", "ledger"]
    assert body["active_alerts"] == {"warning": 2, "critical": 1}
    wide = viewer.get("/api/metrics/summary/", {"minutes": 180}).json()
    assert wide["totals"]["calls"] == 120
    only = viewer.get("/api/metrics/summary/", {"minutes": 180, "integration": "ledger"}).json()
    assert (only["totals"]["calls"], [row["integration"] for row in only["by_integration"]]) == (110, ["ledger"])


@pytest.mark.parametrize("minutes", ["abc", "0", "-5", "1.5", str(8 * 24 * 60)])
def test_a_bad_window_is_400_naming_minutes(viewer, minutes):
    error = error_of(viewer.get("/api/metrics/summary/", {"minutes": minutes}), 400)
    assert (error["code"], list(error["fields"])) == ("invalid", ["minutes"])
    assert error["message"].startswith("minutes: ")


def test_the_summary_of_an_unknown_integration_is_404(viewer):
    assert error_of(viewer.get("/api/metrics/summary/", {"integration": "nope"}), 404)["message"] == (
        'No integration is named "nope".')


# -- who may do what ------------------------------------------------------------------------------

READS = ["/api/alerts/", "/api/alerts/?active=1", "/api/watchdog/report/", "/api/metrics/summary/"]


@pytest.mark.parametrize("url", READS)
def test_reads_need_a_staff_user(url):
    users = clients(CHANGE)
    assert error_of(users["anonymous"].get(url), 401)["code"] == "not_authenticated"
    assert error_of(users["member"].get(url), 403)["code"] == "permission_denied"
    assert users["viewer"].get(url).status_code == 200
    assert users["operator"].get(url).status_code == 200


@pytest.mark.parametrize("action", ["acknowledge", "resolve", "watchdog"])
def test_actions_need_monitoring_change_alert(alerts, action):
    url = "/api/watchdog/run/" if action == "watchdog" else f"/api/alerts/{alerts['spike'].pk}/{action}/"
    users = clients(CHANGE)
    assert error_of(users["anonymous"].post(url), 401)["code"] == "not_authenticated"
    assert error_of(users["member"].post(url), 403)["code"] == "permission_denied"
    error = error_of(users["viewer"].post(url), 403)
    assert error["message"] == "This needs the permission monitoring.change_alert."
    assert users["operator"].post(url).status_code == 200
