"""``manage.py resilience status`` and ``resilience breaker``."""

import json
import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from integrations.management.commands import resilience
from integrations.models import BreakerEvent, Integration
from integrations.resilience import execute, get_engine
from integrations.resilience.events import CallFinished
from monitoring import stats
from monitoring.counters import StatsBuffer

pytestmark = pytest.mark.django_db

OPERATOR = resilience.operator_name()


def run(*args, **options):
    out, err = StringIO(), StringIO()
    call_command("resilience", *args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def record_calls(name, *calls):
    """Store call statistics as a process would flush them: (ok, latency_ms, cache) per call."""
    buffer = StatsBuffer()
    now = time.time()
    for ok, latency_ms, cache in calls:
        buffer.record(CallFinished(name, ok, "live", None if ok else "server_error", 1, 0, latency_ms,
                                   (latency_ms,), None, cache, now))
    stats.flush(buffer)


def refuse(*args):
    raise ConnectionError("upstream down")


def open_breaker(name):
    """Trip the breaker for real, through the engine (shared or per process, as the run is configured)."""
    for _ in range(2):
        assert not execute(name, refuse).ok
    assert get_engine().breaker(name).state == "open"


@pytest.fixture
def billing():
    return Integration.objects.create(name="billing", kind="external_api", hourly_limit=10, failure_threshold=2,
                                      max_retries=0, timeout_enforcement="inline")


def test_status_prints_a_row_per_integration_with_success_rate_p95_quota_and_cache(billing):
    Integration.objects.create(name="quotes", kind="market_data")
    # 9 calls at 30 ms and 1 at 800 ms: p95 falls in the 500-1000 ms bucket, at 750 ms
    record_calls("billing", *[(True, 30.0, "miss")] * 7, (True, 30.0, "hit"), (False, 30.0, "hit"),
                 (True, 800.0, "hit"))
    out, _ = run("status")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "BREAKER", "QUOTA", "SUCCESS", "1h", "P95", "1h", "CACHE", "HITS",
                                "IN", "FLIGHT"]
    billing_row = next(line for line in lines if line.startswith("billing "))
    assert "external_api" in billing_row and "closed" in billing_row
    assert "90.0%" in billing_row  # 9 of 10 succeeded
    assert "750 ms" in billing_row
    assert "30.0%" in billing_row  # 3 hits, 7 misses
    quotes_row = next(line for line in lines if line.startswith("quotes "))
    assert quotes_row.split()[2:] == ["closed", "-", "-", "-", "-", "0"]


def test_status_quota_is_the_hours_attempts_against_the_limit_with_its_level(billing):
    record_calls("billing", *[(True, 5.0, None)] * 9)
    document = json.loads(run("status", "--json")[0])
    quota = document["integrations"][0]["quota"]
    if document["integrations"][0]["scope"] == "recorded":  # without Redis: the fleet's attempts in the figures
        assert (quota["hourly"]["used"], quota["hourly"]["limit"], quota["level"]) == (9, 10, "warning")
        assert "9/10 per hour warning" in run("status")[0]
    else:  # with Redis: the shared counters, which these recorded statistics did not touch
        assert (quota["hourly"]["used"], quota["hourly"]["limit"], quota["level"]) == (0, 10, "healthy")


def test_status_shows_an_open_breaker_and_a_forced_mode(billing):
    Integration.objects.create(name="forced", kind="cache", mode="forced_open")
    open_breaker("billing")
    out, _ = run("status")
    assert next(line for line in out.splitlines() if line.startswith("billing ")).split()[2] == "open"
    # the state callers meet, and the mode that makes it so
    assert "open (forced_open)" in next(line for line in out.splitlines() if line.startswith("forced "))


def test_status_says_where_each_figure_comes_from(billing):
    out, _ = run("status")
    if get_engine().store.shared:
        assert "Breakers and quotas: the fleet's shared state (Redis)." in out
    else:
        assert "Breakers: the last transition recorded by any process; quotas: attempts this hour and today" in out
    assert "Success rate, p95 and cache hits: the last 60 minutes of call figures" in out
    assert "In flight: this process's calls." in out


def test_status_json_has_the_same_figures_under_stable_keys(billing):
    record_calls("billing", (True, 30.0, "hit"), (False, 30.0, "miss"))
    open_breaker("billing")
    document = json.loads(run("status", "--json")[0])
    assert set(document) == {"generated_at", "figures_minutes", "integrations"}
    (row,) = document["integrations"]
    # IntegrationStatus.to_dict(): the names the API and the docs use
    assert set(row) == {"name", "kind", "mode", "scope", "state", "own_state", "opened_at", "changed_at", "quota",
                        "figures", "cache", "in_flight", "concurrency"}
    assert row["scope"] == ("shared" if get_engine().store.shared else "recorded")
    assert set(row["quota"]) == {"hourly", "daily", "level"}
    assert row["state"] == row["own_state"] == "open" and row["mode"] == "normal"
    assert row["changed_at"] is not None and row["opened_at"] is not None
    # the two recorded calls, plus the two that opened the breaker (flushed by nobody yet: not counted)
    assert (row["figures"]["calls"], row["figures"]["success_rate"]) == (2, 0.5)
    assert row["cache"] == {"hits": 1, "misses": 1, "hit_ratio": 0.5, "source": "figures", "entries": 0,
                            "average_age_s": None}  # the command's own L1 is empty
    assert row["in_flight"] == 0 and document["figures_minutes"] == 60


def test_status_without_integrations_says_how_to_add_them():
    out, _ = run("status")
    assert "No integrations" in out and "integrations import" in out
    assert json.loads(run("status", "--json")[0])["integrations"] == []


def test_breaker_open_forces_the_mode_and_records_the_operator(billing, django_capture_on_commit_callbacks):
    assert execute("billing", lambda: "value").ok
    with django_capture_on_commit_callbacks(execute=True):  # the saved mode reaches the engine after commit
        out, _ = run("breaker", "open", "billing")
    billing.refresh_from_db()
    assert billing.mode == "forced_open"
    assert f"billing: breaker open, mode forced_open (forced open by {OPERATOR})" in out
    event = BreakerEvent.objects.get(integration=billing)
    assert (event.from_state, event.to_state, event.by) == ("closed", "open", OPERATOR)
    assert event.reason == "forced open: mode normal -> forced_open"
    assert not execute("billing", lambda: "value").ok  # refused: the engine sees the mode at once


def test_breaker_close_forces_it_closed(billing, django_capture_on_commit_callbacks):
    open_breaker("billing")
    with django_capture_on_commit_callbacks(execute=True):
        out, _ = run("breaker", "close", "billing")
    billing.refresh_from_db()
    assert billing.mode == "forced_closed" and "mode forced_closed" in out
    assert execute("billing", lambda: "value").ok  # let through although the breaker is open
    assert BreakerEvent.objects.filter(integration=billing, by=OPERATOR, to_state="closed").exists()


def test_breaker_reset_closes_an_open_breaker_as_the_operator(billing):
    open_breaker("billing")
    out, err = run("breaker", "reset", "billing")
    assert get_engine().breaker("billing").state == "closed"
    assert f"billing: breaker closed, mode normal (manual reset by {OPERATOR})" in out
    reset = BreakerEvent.objects.get(integration=billing, to_state="closed")
    assert (reset.from_state, reset.by, reset.reason) == ("open", OPERATOR, "manual reset")
    if not get_engine().store.shared:
        assert "No shared state (REDIS_URL is unset)" in err


def test_breaker_reset_returns_a_forced_mode_to_normal_and_records_it(billing):
    billing.force_open()
    run("breaker", "reset", "billing")
    billing.refresh_from_db()
    assert billing.mode == "normal"
    event = BreakerEvent.objects.get(integration=billing)
    assert (event.from_state, event.to_state, event.by) == ("open", "closed", OPERATOR)
    assert event.reason == "manual reset: mode forced_open -> normal"


def test_breaker_reset_of_a_closed_breaker_is_still_recorded_as_the_operators(billing):
    out, _ = run("breaker", "reset", "billing")
    assert "billing: breaker closed, mode normal" in out
    event = BreakerEvent.objects.get(integration=billing)
    assert (event.from_state, event.to_state, event.reason, event.by) == ("closed", "closed", "manual reset", OPERATOR)


def test_breaker_on_an_unknown_name_lists_the_close_matches(billing):
    Integration.objects.create(name="billing-eu", kind="external_api")
    with pytest.raises(CommandError, match=r'^Unknown integration "biling"\. Did you mean: billing, billing-eu\?$'):
        run("breaker", "reset", "biling")
    with pytest.raises(CommandError, match=r'Unknown integration "zzz"\. `manage.py resilience status` lists them'):
        run("breaker", "open", "zzz")
    assert not BreakerEvent.objects.exists()


def test_breaker_with_no_integrations_says_so():
    with pytest.raises(CommandError, match='Unknown integration "billing". There are no integrations yet.'):
        run("breaker", "close", "billing")


def test_the_operator_is_named_by_uid_when_the_os_has_no_name_for_it(monkeypatch):
    def no_name():
        raise OSError("no login name")

    monkeypatch.setattr(resilience.getpass, "getuser", no_name)
    assert resilience.operator_name().startswith("cli:uid-")


def test_the_subcommands_are_required_and_listed():
    with pytest.raises(CommandError, match=r"\{status,breaker,schedules,backup,restore,cache\}"):
        call_command("resilience")
