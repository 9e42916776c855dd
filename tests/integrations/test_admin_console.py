"""The admin as the operations console: every Integration action (logged, breaker ones in the breaker history
naming the operator), the forms that ask for values, view-only staff, the list's statistics, and the history
pages."""

import re
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from integrations.models import BreakerEvent, BreakerState, FaultInjection, Integration
from integrations.resilience import execute
from monitoring.models import CRITICAL, WARNING, Alert, CallStats

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/integrations/integration/"


def fail():
    raise ConnectionError("upstream down")


@pytest.fixture
def billing(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        return Integration.objects.create(name="billing", failure_threshold=1, max_retries=0,
                                          timeout_enforcement="inline", hourly_limit=100)


def act(client, action, *integrations, **data):
    return client.post(CHANGELIST, {"action": action, "_selected_action": [i.pk for i in integrations], **data},
                       follow=True)


def logged(integration, text):
    return LogEntry.objects.filter(object_id=str(integration.pk), change_message__contains=text).exists()


def messages_of(response):
    return [str(message) for message in response.context["messages"]]


@pytest.fixture
def viewer(db):
    """Staff with the view permission on integrations and alerts, and nothing else."""
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_integration", "view_alert",
                                                                          "view_breakerevent"]))
    return user


# -- breaker actions: admin log and breaker history, naming the operator -------------------------------

def test_resetting_an_open_breaker_closes_it_and_its_transition_names_the_operator(
        admin_client, billing, django_capture_on_commit_callbacks):
    execute("billing", fail)
    assert billing.breaker_snapshot().state == "open"
    with django_capture_on_commit_callbacks(execute=True):
        response = act(admin_client, "reset_breakers", billing)
    assert "Breaker reset: billing" in messages_of(response)
    assert billing.breaker_snapshot().state == "closed"
    event = BreakerEvent.objects.filter(integration=billing).first()
    assert (event.from_state, event.to_state, event.reason, event.by) == ("open", "closed", "manual reset", "admin")
    assert logged(billing, "Breaker reset (admin action)")


def test_resetting_a_closed_breaker_is_still_recorded_in_the_breaker_history(admin_client, billing):
    act(admin_client, "reset_breakers", billing)
    event = BreakerEvent.objects.get(integration=billing)
    assert (event.from_state, event.to_state, event.reason, event.by) == ("closed", "closed", "manual reset", "admin")
    assert logged(billing, "Breaker reset")


@pytest.mark.parametrize("action, mode, state, verb", [
    ("force_open", "forced_open", "open", "Breaker forced open"),
    ("force_closed", "forced_closed", "closed", "Breaker forced closed"),
])
def test_forcing_the_breaker_changes_the_mode_and_is_recorded_naming_the_operator(
        admin_client, billing, django_capture_on_commit_callbacks, action, mode, state, verb):
    if action == "force_closed":
        execute("billing", fail)  # open: forcing it closed is a transition callers see
    with django_capture_on_commit_callbacks(execute=True):
        act(admin_client, action, billing)
    billing.refresh_from_db()
    assert billing.mode == mode
    event = BreakerEvent.objects.filter(integration=billing, by="admin").get()
    expected_from = "closed" if action == "force_open" else "open"
    assert (event.from_state, event.to_state) == (expected_from, state)
    assert event.reason == f"{verb.removeprefix('Breaker ')}: mode normal -> {mode}"
    assert logged(billing, f"{verb} (admin action)")
    assert execute("billing", lambda: "ok").ok is (state == "closed")


def test_resetting_a_forced_breaker_returns_it_to_normal_and_records_it(admin_client, billing):
    billing.force_open()
    act(admin_client, "reset_breakers", billing)
    billing.refresh_from_db()
    assert billing.mode == "normal"
    event = BreakerEvent.objects.get(integration=billing)
    assert (event.from_state, event.to_state, event.reason, event.by) == (
        "open", "closed", "manual reset: mode forced_open -> normal", "admin")


def test_an_action_acts_on_every_selected_integration(admin_client, billing):
    other = Integration.objects.create(name="search")
    response = act(admin_client, "force_open", billing, other)
    assert set(Integration.objects.values_list("mode", flat=True)) == {"forced_open"}
    assert "Breaker forced open: billing, search" in messages_of(response)
    assert BreakerEvent.objects.filter(by="admin").count() == 2


# -- degraded mode --------------------------------------------------------------------------------

def test_entering_degraded_mode_asks_the_capacity_first(admin_client, billing):
    response = act(admin_client, "enter_degraded_mode", billing)
    assert response.templates[0].name == "admin/integrations/integration/action_form.html"
    content = response.content.decode()
    assert 'name="capacity"' in content and 'name="apply"' in content and 'value="enter_degraded_mode"' in content
    billing.refresh_from_db()
    assert billing.capacity == 1.0


def test_entering_degraded_mode_sets_the_capacity_and_is_logged(admin_client, billing):
    response = act(admin_client, "enter_degraded_mode", billing, apply="yes", capacity="0.25")
    billing.refresh_from_db()
    assert billing.capacity == 0.25
    assert "Degraded mode entered at capacity 0.25: billing" in messages_of(response)
    assert logged(billing, "Degraded mode entered at capacity 0.25 (admin action)")
    assert not BreakerEvent.objects.exists()  # not a breaker action


@pytest.mark.parametrize("capacity, error", [
    ("1", "Degraded mode runs below full capacity"),
    ("1.5", "Degraded mode runs below full capacity"),
    ("0", "Capacity must be in (0, 1]"),
    ("-0.5", "Capacity must be in (0, 1]"),
    ("half", "Enter a number."),
    ("", "This field is required."),
])
def test_a_bad_capacity_is_refused_on_the_capacity_field(admin_client, billing, capacity, error):
    other = Integration.objects.create(name="search")
    response = act(admin_client, "enter_degraded_mode", billing, other, apply="yes", capacity=capacity)
    form = response.context["form"]
    assert any(error in message for message in form.errors["capacity"]), form.errors
    assert set(Integration.objects.values_list("capacity", flat=True)) == {1.0}
    assert not LogEntry.objects.exists()


def test_leaving_degraded_mode_restores_full_capacity(admin_client, billing):
    billing.set_capacity(0.5)
    response = act(admin_client, "leave_degraded_mode", billing)
    billing.refresh_from_db()
    assert billing.capacity == 1.0
    assert "Degraded mode left (capacity 1): billing" in messages_of(response)
    assert logged(billing, "Degraded mode left (capacity 1) (admin action)")


def test_clearing_the_cache_moves_its_version_on_and_is_logged(admin_client, billing):
    act(admin_client, "clear_caches", billing)
    billing.refresh_from_db()
    assert billing.cache_version == 1
    assert logged(billing, "Cache cleared (admin action)")


# -- fault injection ------------------------------------------------------------------------------

def test_fault_injection_is_refused_with_a_clear_message_while_the_setting_is_off(admin_client, billing, settings):
    settings.RESILIENCE_FAULT_INJECTION = False
    response = act(admin_client, "inject_fault", billing)
    assert response.templates[0].name == "admin/change_list.html"  # no form: straight back to the list
    assert any("Fault injection is off on this site: set RESILIENCE_FAULT_INJECTION=true" in message
               for message in messages_of(response))
    response = act(admin_client, "inject_fault", billing, apply="yes", error_percent="50", latency_ms="0",
                   minutes="5")
    assert not FaultInjection.objects.exists()
    assert not logged(billing, "Fault")


def test_injecting_a_fault_asks_for_it_then_records_who_did_it(admin_client, billing, settings):
    settings.RESILIENCE_FAULT_INJECTION = True
    response = act(admin_client, "inject_fault", billing)
    assert {"error_percent", "latency_ms", "minutes"} <= set(response.context["form"].fields)
    response = act(admin_client, "inject_fault", billing, apply="yes", error_percent="30", latency_ms="200",
                   minutes="15")
    assert "Fault injected: 30% errors, 200 ms latency for 15 min: billing" in messages_of(response)
    billing.refresh_from_db()
    assert billing.fault_active and (billing.fault_error_percent, billing.fault_latency_ms) == (30, 200)
    injection = FaultInjection.objects.get()
    assert injection.created_by == "admin"
    assert timedelta(minutes=14) < injection.ends_at - timezone.now() <= timedelta(minutes=15)
    assert logged(billing, "Fault injected: 30% errors, 200 ms latency for 15 min (admin action)")
    list_page = admin_client.get(CHANGELIST).content.decode()
    assert "30% errors, +200 ms until" in list_page


@pytest.mark.parametrize("values, field, error", [
    ({"error_percent": "150", "latency_ms": "0", "minutes": "5"}, "error_percent", "between 0 and 100"),
    ({"error_percent": "0", "latency_ms": "0", "minutes": "5"}, "error_percent", "Inject errors, latency, or both"),
    ({"error_percent": "10", "latency_ms": "-5", "minutes": "5"}, "latency_ms", "0 or more"),
    ({"error_percent": "10", "latency_ms": "0", "minutes": "0"}, "minutes", "an injection always ends"),
    ({"error_percent": "10", "latency_ms": "0", "minutes": "100000"}, "minutes", "at most 1440"),
    ({"error_percent": "ten", "latency_ms": "0", "minutes": "5"}, "error_percent", "Enter a number."),
])
def test_a_bad_fault_is_refused_on_the_field_at_fault(admin_client, billing, settings, values, field, error):
    settings.RESILIENCE_FAULT_INJECTION = True
    response = act(admin_client, "inject_fault", billing, apply="yes", **values)
    errors = response.context["form"].errors
    assert any(error in message for message in errors[field]), errors
    assert not FaultInjection.objects.exists()
    billing.refresh_from_db()
    assert not billing.fault_active


def test_stopping_a_fault_ends_it_now_and_records_who(admin_client, billing, settings):
    settings.RESILIENCE_FAULT_INJECTION = True
    billing.inject_fault(error_percent=50, minutes=30, by="alice")
    act(admin_client, "stop_fault", billing)
    billing.refresh_from_db()
    assert not billing.fault_active
    assert FaultInjection.objects.get().stopped_by == "admin"
    assert logged(billing, "Fault injection stopped (admin action)")


# -- view-only staff ------------------------------------------------------------------------------

def test_view_only_staff_see_the_console_but_are_offered_no_action(client, viewer, billing):
    client.force_login(viewer)
    response = client.get(CHANGELIST)
    assert response.status_code == 200
    assert response.context["action_form"] is None
    assert 'name="_selected_action"' not in response.content.decode()
    change = client.get(f"{CHANGELIST}{billing.pk}/change/")
    assert change.status_code == 200
    content = change.content.decode()
    assert "Live breaker" in content and 'name="_save"' not in content


@pytest.mark.parametrize("action, extra", [
    ("force_open", {}),
    ("reset_breakers", {}),
    ("clear_caches", {}),
    ("enter_degraded_mode", {"apply": "yes", "capacity": "0.5"}),
    ("inject_fault", {"apply": "yes", "error_percent": "50", "latency_ms": "0", "minutes": "5"}),
])
def test_a_forged_action_post_from_view_only_staff_changes_nothing(client, viewer, billing, settings, action, extra):
    settings.RESILIENCE_FAULT_INJECTION = True
    client.force_login(viewer)
    before = Integration.objects.filter(pk=billing.pk).values().get()
    response = client.post(CHANGELIST, {"action": action, "_selected_action": [billing.pk], "index": 0, **extra})
    assert response.status_code in (200, 302, 403)
    assert Integration.objects.filter(pk=billing.pk).values().get() == before
    assert not LogEntry.objects.exists()
    assert not BreakerEvent.objects.exists()
    assert not FaultInjection.objects.exists()


# -- the list's columns and the change page ------------------------------------------------------------

def minute_ago(minutes):
    return timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=minutes)


def test_the_list_shows_the_last_hours_success_rate_and_p95_in_colour(admin_client, billing):
    slow = Integration.objects.create(name="search", slow_call_ms=50)
    CallStats.objects.create(integration=billing, minute=minute_ago(3), calls=100, successes=99,
                             failures_timeout=1, latency_le_25=100)
    CallStats.objects.create(integration=slow, minute=minute_ago(5), calls=10, successes=5,
                             failures_server_error=5, latency_le_250=10)
    CallStats.objects.create(integration=slow, minute=minute_ago(90), calls=1000, successes=1000,
                             latency_le_1=1000)  # outside the hour
    response = admin_client.get(CHANGELIST)
    content = response.content.decode()
    assert '<strong style="color:#2e7d32">99.0%</strong>' in content
    assert '<strong style="color:#c62828">50.0%</strong>' in content
    rows = {row.name: row for row in response.context["cl"].result_list}
    billing_figures, search_figures = rows["billing"].status.figures, rows["search"].status.figures
    assert billing_figures["calls"] == 100 and search_figures["calls"] == 10
    assert f'<strong style="color:#2e7d32">{billing_figures["latency_p95_ms"]:.0f} ms</strong>' in content
    assert f'<strong style="color:#c62828">{search_figures["latency_p95_ms"]:.0f} ms</strong>' in content


def changelist_queries(client):
    with CaptureQueriesContext(connection) as queries:
        assert client.get(CHANGELIST).status_code == 200
    return len(queries)


def test_the_list_columns_take_the_same_queries_whatever_the_number_of_rows(admin_client, django_assert_max_num_queries):
    for index in range(2):
        integration = Integration.objects.create(name=f"few-{index}", hourly_limit=10)
        CallStats.objects.create(integration=integration, minute=minute_ago(1), calls=5, successes=5, latency_le_10=5)
    few = changelist_queries(admin_client)
    for index in range(20):
        integration = Integration.objects.create(name=f"many-{index}", hourly_limit=10)
        CallStats.objects.create(integration=integration, minute=minute_ago(1), calls=5, successes=5, latency_le_10=5)
    assert changelist_queries(admin_client) == few
    with django_assert_max_num_queries(few):
        admin_client.get(CHANGELIST)


def test_the_change_page_shows_the_live_breaker_the_recorded_state_and_recent_events(
        admin_client, billing, django_capture_on_commit_callbacks):
    execute("billing", fail)
    response = admin_client.get(f"{CHANGELIST}{billing.pk}/change/")
    content = response.content.decode()
    assert "Live state" in content
    assert re.search(r"open since [-\d]+ [:\d]+ · 0 consecutive failure\(s\)", content)
    assert "recorded breaker state" in content.lower()
    assert BreakerState.objects.get(integration=billing).state == "open"
    assert "closed → " in content and "Every event of billing" in content
    assert f"/admin/integrations/breakerevent/?integration__id__exact={billing.pk}" in content


def test_the_add_page_has_no_live_state(admin_client):
    response = admin_client.get(f"{CHANGELIST}add/")
    assert response.status_code == 200
    assert "Live state" not in response.content.decode()


# -- history pages ------------------------------------------------------------------------------

def test_the_breaker_history_is_read_only_and_filters_by_integration_state_and_operator(admin_client, billing):
    other = Integration.objects.create(name="search")
    billing.operate_breaker("open", "alice")
    other.operate_breaker("open", "bob")
    billing.operate_breaker("reset", "bob")
    url = reverse("admin:integrations_breakerevent_changelist")
    response = admin_client.get(url)
    assert {spec.title for spec in response.context["cl"].filter_specs} == {"integration", "to state", "by"}
    assert admin_client.get(url, {"by": "bob"}).context["cl"].result_count == 2
    assert admin_client.get(url, {"to_state": "open"}).context["cl"].result_count == 2
    assert admin_client.get(url, {"integration__id__exact": billing.pk}).context["cl"].result_count == 2
    event = BreakerEvent.objects.first()
    assert admin_client.get(reverse("admin:integrations_breakerevent_add")).status_code == 403
    assert 'name="_save"' not in admin_client.get(
        reverse("admin:integrations_breakerevent_change", args=[event.pk])).content.decode()
    assert admin_client.get(reverse("admin:integrations_breakerevent_delete", args=[event.pk])).status_code == 403


def test_the_alert_list_filters_by_activity_severity_and_status_with_colours(admin_client, billing):
    Alert.raise_or_update(Alert.QUOTA, WARNING, "85% used", integration=billing)
    critical, _ = Alert.raise_or_update(Alert.UNAVAILABLE, CRITICAL, "down", integration=billing)
    resolved, _ = Alert.raise_or_update(Alert.ERROR_SPIKE, WARNING, "errors", integration=billing)
    resolved.resolve()
    url = reverse("admin:monitoring_alert_changelist")
    response = admin_client.get(url)
    assert {"activity", "severity", "status"} <= {spec.title for spec in response.context["cl"].filter_specs}
    assert admin_client.get(url, {"active": "yes"}).context["cl"].result_count == 2
    assert admin_client.get(url, {"active": "no"}).context["cl"].result_count == 1
    assert [a.pk for a in admin_client.get(url, {"severity": "critical"}).context["cl"].result_list] == [critical.pk]
    assert admin_client.get(url, {"status": "resolved"}).context["cl"].result_count == 1
    assert '<strong style="color:#c62828">Critical</strong>' in response.content.decode()


def test_view_only_staff_cannot_acknowledge_an_alert(client, viewer, billing):
    alert, _ = Alert.raise_or_update(Alert.QUOTA, WARNING, "85% used", integration=billing)
    client.force_login(viewer)
    url = reverse("admin:monitoring_alert_changelist")
    assert client.get(url).context["action_form"] is None
    client.post(url, {"action": "acknowledge", "_selected_action": [alert.pk], "index": 0})
    alert.refresh_from_db()
    assert alert.status == Alert.OPEN


def test_the_fault_injection_history_is_read_only(admin_client, billing, settings):
    settings.RESILIENCE_FAULT_INJECTION = True
    billing.inject_fault(error_percent=10, minutes=5, by="alice")
    url = reverse("admin:integrations_faultinjection_changelist")
    assert "alice" in admin_client.get(url).content.decode()
    assert admin_client.get(reverse("admin:integrations_faultinjection_add")).status_code == 403


def test_the_admin_index_links_to_the_system_health_page(admin_client):
    content = admin_client.get("/admin/").content.decode()
    assert f'href="{reverse("admin:system_health")}"' in content
    assert "Recent actions" in content  # the stock index is still there
