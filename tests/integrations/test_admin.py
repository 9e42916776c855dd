"""The Integration admin: forms start from presets, live state shows, actions act."""

import pytest
from django.contrib.admin.models import LogEntry
from django.core.management import call_command

from integrations.models import Integration
from integrations.resilience import execute
from integrations.resilience.policy import KNOB_NAMES

pytestmark = pytest.mark.django_db


def test_the_add_form_starts_from_the_preset_of_the_chosen_kind(admin_client):
    response = admin_client.get("/admin/integrations/integration/add/?kind=ai_service")
    assert response.status_code == 200
    form = response.context["adminform"].form
    assert form.initial["kind"] == "ai_service"
    assert form.initial["timeout_ms"] == 60_000
    assert form.initial["backoff_multiplier"] == 1.5


def test_a_bad_policy_is_refused_with_the_field_named(admin_client):
    row = Integration(name="billing")
    form_data = {knob: "" if getattr(row, knob) is None else getattr(row, knob) for knob in KNOB_NAMES}
    form_data.update(name="billing", kind="external_api", description="", base_delay_ms=5000, max_delay_ms=100)
    response = admin_client.post("/admin/integrations/integration/add/", form_data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "base_delay_ms" in errors
    assert not Integration.objects.exists()


def test_the_changelist_shows_the_live_breaker_state(admin_client):
    Integration.objects.create(name="billing", failure_threshold=1, max_retries=0, timeout_enforcement="inline")
    execute("billing", lambda: (_ for _ in ()).throw(ConnectionError("down")))
    response = admin_client.get("/admin/integrations/integration/")
    assert response.status_code == 200
    assert b"open" in response.content


def test_the_reset_action_closes_the_breaker_and_is_logged(admin_client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        row = Integration.objects.create(name="billing", mode="forced_open")
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post("/admin/integrations/integration/",
                                     {"action": "reset_breakers", "_selected_action": [row.pk]}, follow=True)
    assert response.status_code == 200
    row.refresh_from_db()
    assert row.mode == "normal"
    assert execute("billing", lambda: "ok").ok
    assert LogEntry.objects.filter(object_id=str(row.pk), change_message__contains="Breaker reset").exists()


def test_seed_integrations_creates_one_per_kind_and_is_idempotent():
    call_command("seed_integrations")
    call_command("seed_integrations")
    assert sorted(Integration.objects.values_list("kind", flat=True)) == sorted(
        ["external_api", "database", "ai_service", "market_data", "cache"])


def test_a_time_window_without_its_duration_is_refused_naming_the_duration(admin_client):
    row = Integration(name="billing")
    form_data = {knob: "" if getattr(row, knob) is None else getattr(row, knob) for knob in KNOB_NAMES}
    form_data.update(name="billing", kind="external_api", description="", window_type="time", window_duration_s="")
    response = admin_client.post("/admin/integrations/integration/add/", form_data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["window_duration_s"]
    assert "A time window needs its duration" in errors["window_duration_s"][0]
    assert not Integration.objects.exists()


def test_the_live_breaker_says_what_its_window_is(admin_client):
    timed = Integration.objects.create(name="timed", window_type="time", window_duration_s=90,
                                       timeout_enforcement="inline")
    counted = Integration.objects.create(name="counted", window_size=25, timeout_enforcement="inline")
    execute("timed", lambda: 1)
    page = admin_client.get(f"/admin/integrations/integration/{timed.pk}/change/").content.decode()
    assert "window (last 90 s): 1 call(s), 0 failure(s)" in page
    page = admin_client.get(f"/admin/integrations/integration/{counted.pk}/change/").content.decode()
    assert "window (last 25 calls): 0 call(s)" in page
