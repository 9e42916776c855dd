"""The System health page: who may see it, what its JSON document says, and the page that carries it."""

import json
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from dlq_support import enqueue
from integrations.dlq.models import DeadLetter
from integrations.models import Integration
from integrations.resilience import execute
from monitoring import health_page
from monitoring.models import CRITICAL, WARNING, Alert, CallStats

pytestmark = pytest.mark.django_db

URL = reverse("admin:system_health")
JSON_URL = f"{URL}?format=json"


def minute_ago(minutes):
    return timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=minutes)


def fail():
    raise ConnectionError("upstream down")


@pytest.fixture
def integrations(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        billing = Integration.objects.create(name="billing", hourly_limit=10, daily_limit=1000, slow_call_ms=200)
        search = Integration.objects.create(name="search", failure_threshold=1, max_retries=0,
                                            timeout_enforcement="inline")
        Integration.objects.create(name="geo", capacity=0.5)
    return billing, search


def card(document, name):
    return next(card for card in document["integrations"] if card["name"] == name)


# -- who may see it -----------------------------------------------------------------------------

@pytest.mark.parametrize("url", [URL, JSON_URL])
def test_anonymous_visitors_are_sent_to_the_admin_login(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(f"{reverse('admin:login')}?next=")


def test_users_who_are_not_staff_are_sent_to_the_admin_login(client):
    client.force_login(User.objects.create_user("customer", password="pw"))
    assert client.get(JSON_URL).status_code == 302


def test_staff_without_the_view_permission_on_integrations_are_refused(client):
    client.force_login(User.objects.create_user("clerk", password="pw", is_staff=True))
    assert client.get(URL).status_code == 403
    assert client.get(JSON_URL).status_code == 403


def test_view_only_staff_see_the_page(client):
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_integration"))
    client.force_login(user)
    assert client.get(URL).status_code == 200
    assert client.get(JSON_URL).status_code == 200
    # the page is in the admin's index, under Monitoring, for them: a project adds no URL for it
    index = client.get(reverse("admin:index")).content.decode()
    assert f'href="{URL}"' in index and "System health" in index


def test_the_page_is_not_in_the_index_of_staff_who_may_not_see_it(client):
    client.force_login(User.objects.create_user("clerk", password="pw", is_staff=True))
    assert f'href="{URL}"' not in client.get(reverse("admin:index")).content.decode()


# -- the document --------------------------------------------------------------------------------

def test_each_integration_has_a_card_with_its_live_breaker_and_quota(admin_client, integrations,
                                                                   django_capture_on_commit_callbacks):
    billing, search = integrations
    execute("search", fail)  # opens search's breaker
    for _ in range(9):
        execute("billing", lambda: "ok")
    with django_capture_on_commit_callbacks(execute=True):
        billing.force_open()
    assert not execute("billing", lambda: "ok").ok  # refused by the forced-open breaker: no quota spent
    document = admin_client.get(JSON_URL).json()
    assert [c["name"] for c in document["integrations"]] == ["billing", "geo", "search"]
    assert (card(document, "search")["state"], card(document, "search")["mode"]) == ("open", "normal")
    assert (card(document, "billing")["state"], card(document, "billing")["own_state"],
            card(document, "billing")["mode"]) == ("open", "closed", "forced_open")
    assert card(document, "geo")["state"] == "closed" and card(document, "geo")["capacity"] == 0.5
    assert card(document, "search")["quota"] is None
    quota = card(document, "billing")["quota"]
    assert quota["hourly"] == {"used": 9, "limit": 10, "ratio": 0.9, "level": "warning"}
    assert quota["daily"] == {"used": 9, "limit": 1000, "ratio": 0.009, "level": "healthy"}
    assert quota["level"] == "warning"
    assert card(document, "billing")["url"] == reverse("admin:integrations_integration_change", args=[billing.pk])


def test_a_card_has_the_last_hours_calls_rates_percentiles_and_calls_per_minute(admin_client, integrations):
    billing, _ = integrations
    CallStats.objects.create(integration=billing, minute=minute_ago(0), calls=8, successes=8, latency_le_100=8,
                             cache_hits=3, cache_misses=1)
    CallStats.objects.create(integration=billing, minute=minute_ago(10), calls=12, successes=9,
                             failures_timeout=3, latency_le_250=12, cache_hits=1, cache_misses=3)
    CallStats.objects.create(integration=billing, minute=minute_ago(60), calls=500, successes=500,
                             latency_le_1=500)  # an hour ago: out of the window
    document = admin_client.get(JSON_URL).json()
    billing_card = card(document, "billing")
    assert billing_card["calls"] == 20
    assert billing_card["success_rate"] == pytest.approx(17 / 20)
    assert billing_card["success_level"] == "warning"
    latency = billing_card["latency"]
    assert 100 < latency["p50_ms"] <= 250 and latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= 250
    assert latency["level"] == "critical"  # p95 above the integration's slow_call_ms of 200
    assert billing_card["cache"] == {"hits": 4, "misses": 4, "hit_ratio": 0.5}
    series = billing_card["calls_per_minute"]
    assert len(series) == health_page.WINDOW_MINUTES == 60
    assert (series[-1], series[-11], sum(series)) == (8, 12, 20)
    assert card(document, "geo")["calls_per_minute"] == [0] * 60
    assert card(document, "geo")["success_rate"] is None and card(document, "geo")["latency"]["p95_ms"] is None
    assert document["cache"] == {"hits": 4, "misses": 4, "hit_ratio": 0.5}


def test_the_overall_status_and_active_alerts_come_from_the_watchdog_report(admin_client, integrations):
    billing, _ = integrations
    assert admin_client.get(JSON_URL).json()["status"] == "healthy"
    Alert.raise_or_update(Alert.QUOTA, WARNING, "85% of the hourly quota used", integration=billing)
    assert admin_client.get(JSON_URL).json()["status"] == "warning"
    critical, _ = Alert.raise_or_update(Alert.UNAVAILABLE, CRITICAL, "unavailable: breaker open", integration=billing)
    document = admin_client.get(JSON_URL).json()
    assert document["status"] == "critical"
    assert [a["message"] for a in document["critical"]] == ["unavailable: breaker open"]
    assert document["critical"][0]["url"] == reverse("admin:monitoring_alert_change", args=[critical.pk])
    assert [a["message"] for a in document["warnings"]] == ["85% of the hourly quota used"]


def test_dead_letter_counts_are_on_the_page_and_on_each_card(admin_client, integrations):
    enqueue(integration="billing")
    enqueue(integration="billing")
    dead = enqueue(integration="search")
    DeadLetter.objects.filter(pk=dead.pk).update(status="dead")
    document = admin_client.get(JSON_URL).json()
    assert document["dead_letters"]["waiting"] == 2
    assert document["dead_letters"]["by_status"]["dead"] == 1
    assert document["dead_letters"]["url"] == reverse("admin:dlq_deadletter_changelist")
    assert card(document, "billing")["dead_letters_waiting"] == 2
    assert card(document, "search")["dead_letters_waiting"] == 0


def test_fault_injections_in_force_are_listed_with_who_started_them(admin_client, integrations, settings):
    billing, search = integrations
    settings.RESILIENCE_FAULT_INJECTION = True
    billing.inject_fault(error_percent=25, latency_ms=100, minutes=10, by="alice")
    search.inject_fault(error_percent=50, minutes=10, by="bob")
    search.stop_fault(by="bob")
    document = admin_client.get(JSON_URL).json()
    assert document["fault_injection_enabled"] is True
    assert [(f["integration"], f["error_percent"], f["latency_ms"], f["created_by"]) for f in document["faults"]] == [
        ("billing", 25, 100, "alice")]
    assert card(document, "billing")["fault"]["created_by"] == "alice"
    assert card(document, "search")["fault"] is None


def test_the_document_takes_the_same_queries_whatever_the_number_of_integrations(admin_client, integrations):
    def queries():
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(JSON_URL).status_code == 200
        return len(captured)

    few = queries()
    for index in range(15):
        integration = Integration.objects.create(name=f"extra-{index}", hourly_limit=5)
        CallStats.objects.create(integration=integration, minute=minute_ago(2), calls=3, successes=3, latency_le_5=3)
        Alert.raise_or_update(Alert.QUOTA, WARNING, "quota", integration=integration)
    assert queries() == few


# -- the page ---------------------------------------------------------------------------------------

class PolicyFinder(HTMLParser):
    """Inline scripts (other than JSON data), <style> blocks, event handler attributes, other origins."""

    def __init__(self):
        super().__init__()
        self.found = []
        self.scripts = []
        self.stylesheets = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "script":
            if attributes.get("src"):
                self.scripts.append(attributes["src"])
            elif attributes.get("type") != "application/json":
                self.found.append("inline script")
        if tag == "style":
            self.found.append("<style> block")
        if tag == "link" and attributes.get("rel") == "stylesheet":
            self.stylesheets.append(attributes["href"])
        for name, value in attrs:
            if name.startswith("on"):
                self.found.append(f"event handler {name}")
            if name in ("src", "href") and value and value.startswith(("http:", "https:", "//")):
                self.found.append(f"another origin: {value}")


def test_the_page_carries_its_document_its_own_static_files_and_nothing_the_csp_forbids(admin_client, integrations):
    response = admin_client.get(URL)
    assert response.status_code == 200
    assert [t.name for t in response.templates][0] == "monitoring/system_health.html"
    content = response.content.decode()
    finder = PolicyFinder()
    finder.feed(content)
    assert finder.found == []
    assert "/static/monitoring/health.js" in finder.scripts
    assert "/static/monitoring/health.css" in finder.stylesheets
    assert f'data-endpoint="{URL}?format=json"' in content
    start = content.index('<script id="system-health-data" type="application/json">')
    data = content[content.index(">", start) + 1:content.index("</script>", start)]
    document = json.loads(data)
    assert [c["name"] for c in document["integrations"]] == ["billing", "geo", "search"]
    assert document["refresh_seconds"] == 30
    assert "Content-Security-Policy" in response.headers


def test_the_page_is_linked_from_every_admin_page_for_those_who_may_see_it(admin_client, client):
    assert f'<a href="{URL}">System health</a>' in admin_client.get("/admin/integrations/").content.decode()
    clerk = User.objects.create_user("clerk", password="pw", is_staff=True)
    client.force_login(clerk)
    assert "System health" not in client.get("/admin/").content.decode()
