"""The watchdog on crafted statistics: each rule fires, deduplicates, escalates and resolves.

Time is injected (``NOW``) and the statistics rows are written directly, so
every run sees exactly the traffic the test describes.
"""

import json
from datetime import datetime, timedelta, timezone

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone as django_timezone

from integrations.models import BreakerState, Integration
from monitoring import watchdog
from monitoring.models import CRITICAL, WARNING, Alert, CallStats

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_stats_buffer")]

NOW = datetime(2026, 1, 5, 12, 30, tzinfo=timezone.utc)  # 30 minutes into the UTC hour


@pytest.fixture
def billing():
    return Integration.objects.create(name="billing", slow_call_ms=1_000)


def traffic(integration, minutes, now=NOW, **counts):
    """One row per minute ago in ``minutes``, each with ``counts`` (calls default: successes + the rest)."""
    for ago in minutes:
        row = dict(counts)
        row.setdefault("calls", sum(v for k, v in counts.items() if k.startswith(("successes", "failures_",
                                                                                   "rejected_"))))
        CallStats.objects.update_or_create(integration=integration, minute=now - timedelta(minutes=ago),
                                           defaults=row)


def replace_traffic(integration, minutes, **counts):
    CallStats.objects.filter(integration=integration).delete()
    traffic(integration, minutes, **counts)


def run(at=NOW):
    return watchdog.run(now=at)


def active(kind, integration=None):
    return Alert.objects.active().filter(kind=kind, integration=integration).first()


HOUR = range(1, 61)
RECENT = range(1, 6)


# -- error spike ---------------------------------------------------------------------------------

def test_an_error_spike_fires_deduplicates_escalates_and_resolves(billing):
    traffic(billing, HOUR, successes=6, failures_server_error=4)  # 40 %
    run()
    alert = active(Alert.ERROR_SPIKE, billing)
    assert (alert.severity, alert.details["error_percent"]) == (WARNING, 40.0)
    run(NOW + timedelta(minutes=1))
    alert.refresh_from_db()
    assert alert.occurrences == 2 and Alert.objects.filter(kind=Alert.ERROR_SPIKE).count() == 1
    replace_traffic(billing, HOUR, successes=2, failures_timeout=8)  # 80 %
    report = run()
    alert.refresh_from_db()
    assert alert.severity == CRITICAL and report["changes"]["escalated"] == [alert.pk]
    replace_traffic(billing, HOUR, successes=10)
    report = run()
    alert.refresh_from_db()
    assert alert.status == Alert.RESOLVED and alert.pk in report["changes"]["resolved"]


def test_errors_below_30_percent_or_client_errors_and_refusals_are_no_error_spike(billing):
    traffic(billing, HOUR, successes=5, failures_client_error=3, rejected_open=10, failures_network=2)
    run()
    assert active(Alert.ERROR_SPIKE, billing) is None  # 2 errors of 10 calls let through: 20 %


def test_too_few_calls_make_no_rate(billing):
    traffic(billing, range(1, 4), failures_network=5)  # 15 calls, all failed
    run()
    assert not Alert.objects.exists()


# -- slow calls ----------------------------------------------------------------------------------

def test_slow_calls_fire_when_most_calls_exceed_slow_call_ms_and_resolve_when_fast_again(billing):
    traffic(billing, HOUR, successes=10, latency_le_250=4, latency_le_2500=6)  # 60 % above 1,000 ms
    run()
    alert = active(Alert.SLOW_CALLS, billing)
    assert alert.severity == WARNING and alert.details["slow_percent"] == 60.0
    assert alert.details["p95_ms"] > 1_000
    run()
    alert.refresh_from_db()
    assert alert.occurrences == 2
    replace_traffic(billing, HOUR, successes=10, latency_le_250=9, latency_le_2500=1)
    run()
    alert.refresh_from_db()
    assert alert.status == Alert.RESOLVED


def test_slow_calls_use_each_integrations_own_threshold(billing):
    Integration.objects.filter(pk=billing.pk).update(slow_call_ms=5_000)
    traffic(billing, HOUR, successes=10, latency_le_2500=10)
    run()
    assert active(Alert.SLOW_CALLS, billing) is None


# -- unavailable ---------------------------------------------------------------------------------

def test_a_breaker_open_longer_than_the_limit_makes_the_integration_unavailable_until_it_closes(billing):
    state = BreakerState.objects.create(integration=billing, state="open", opened_at=NOW - timedelta(minutes=4))
    run()
    assert active(Alert.UNAVAILABLE, billing) is None  # open for 4 minutes: not yet
    run(NOW + timedelta(minutes=2))
    alert = active(Alert.UNAVAILABLE, billing)
    assert alert.severity == CRITICAL and "breaker open for 6 min" in alert.message
    state.state = "closed"
    state.save()
    run(NOW + timedelta(minutes=3))
    alert.refresh_from_db()
    assert alert.status == Alert.RESOLVED


def test_more_than_half_failures_in_the_last_minutes_make_it_unavailable(billing):
    traffic(billing, range(6, 61), successes=10)
    traffic(billing, RECENT, successes=4, failures_network=6)  # 60 % over the last 5 minutes
    run()
    alert = active(Alert.UNAVAILABLE, billing)
    assert alert.details["failure_percent"] == 60.0 and "60% failures" in alert.message


def test_more_than_30_percent_timeouts_make_it_unavailable(billing):
    traffic(billing, RECENT, successes=6, failures_timeout=4)
    run()
    alert = active(Alert.UNAVAILABLE, billing)
    assert "40% timeouts" in alert.message and alert.details["timeout_percent"] == 40.0
    replace_traffic(billing, RECENT, successes=10)
    run()
    assert active(Alert.UNAVAILABLE, billing) is None


# -- quota ---------------------------------------------------------------------------------------

def test_quota_warns_from_80_percent_escalates_from_95_and_resolves_in_the_next_hour(billing):
    billing.hourly_limit = 1_000
    billing.save()
    traffic(billing, range(0, 20), successes=1, attempts=40)  # 800 attempts this hour
    traffic(billing, range(31, 60), successes=1, attempts=500)  # the previous hour does not count
    run()
    alert = active(Alert.QUOTA, billing)
    assert (alert.severity, alert.details["used"], alert.details["window"]) == (WARNING, 800, "hourly")
    traffic(billing, [20, 21, 22, 23], successes=1, attempts=40)  # 960
    run()
    alert.refresh_from_db()
    assert alert.severity == CRITICAL and alert.occurrences == 2
    run(NOW + timedelta(minutes=31))  # 13:01: a new hourly window
    alert.refresh_from_db()
    assert alert.status == Alert.RESOLVED


def test_the_daily_quota_counts_since_midnight_utc(billing):
    billing.daily_limit = 10_000
    billing.save()
    traffic(billing, range(0, 700, 10), successes=1, attempts=130)  # 70 rows of today: 9,100 = 91 %
    traffic(billing, [760, 800], successes=1, attempts=5_000)  # yesterday
    run()
    alert = active(Alert.QUOTA, billing)
    assert (alert.severity, alert.details["window"], alert.details["used"]) == (WARNING, "daily", 9_100)


def daily_used(integration, at):
    (seen,) = [o for o in watchdog.observe(at, watchdog.thresholds()) if o.integration.pk == integration.pk]
    return seen.day_attempts


def test_todays_earlier_hours_are_summed_once_an_hour_and_this_hours_attempts_every_run(billing):
    billing.daily_limit = 100_000
    billing.save()
    traffic(billing, range(40, 700, 60), successes=1, attempts=100)  # 11 rows in earlier hours today
    traffic(billing, [5], successes=1, attempts=7)  # this hour
    with CaptureQueriesContext(connection) as first:
        assert daily_used(billing, NOW) == 1_107
    traffic(billing, [2], successes=1, attempts=3)  # this hour, later: counted by the next run
    with CaptureQueriesContext(connection) as second:
        assert daily_used(billing, NOW) == 1_110
    assert len(second) == len(first) - 1  # the earlier hours' sum was kept
    run(NOW + timedelta(minutes=31))  # 13:01: a new hour, summed again
    assert daily_used(billing, NOW + timedelta(minutes=31)) == 1_110


def test_the_hour_just_ended_is_summed_again_while_its_last_minutes_may_still_be_flushed(billing):
    billing.daily_limit = 100_000
    billing.save()
    just_after = NOW.replace(minute=0, second=30)  # 12:00:30: 11:59's rows may still be on their way
    traffic(billing, [3], now=just_after, successes=1, attempts=10)  # 11:57
    assert daily_used(billing, just_after) == 10
    traffic(billing, [1], now=just_after, successes=1, attempts=5)  # 11:59, flushed late
    assert daily_used(billing, just_after) == 15


def test_a_daily_limit_set_during_the_hour_counts_the_earlier_hours_already_summed(billing):
    Integration.objects.create(name="search", daily_limit=10_000)
    traffic(billing, range(40, 700, 60), successes=1, attempts=100)  # 11 rows in earlier hours today
    daily_used(billing, NOW)  # the earlier hours are summed for search's limit and kept; billing has none
    Integration.objects.filter(pk=billing.pk).update(daily_limit=1_200)
    with CaptureQueriesContext(connection) as queries:
        assert daily_used(billing, NOW) == 1_100
    assert not [q for q in queries.captured_queries if "attempts" in q["sql"] and "used" in q["sql"]]
    run()
    assert active(Alert.QUOTA, billing).details["daily_used"] == 1_100


def test_a_window_shorter_than_the_hour_so_far_counts_only_its_own_minutes(billing, settings):
    """At 12:30 a 20-minute window starts at 12:10, after the hour: the rows read start at 12:00 for
    the hourly quota, and the window's sums leave out 12:00 to 12:09."""
    settings.RESILIENCE_WATCHDOG = {"window_minutes": 20}
    billing.hourly_limit = 1_000
    billing.save()
    traffic(billing, range(21, 30), failures_server_error=10, attempts=10)  # 12:01-12:09: all failed
    traffic(billing, range(1, 21), successes=10, attempts=40)  # 12:10-12:29: all fine; 890 attempts in all
    run()
    assert active(Alert.ERROR_SPIKE, billing) is None
    assert active(Alert.QUOTA, billing).details["used"] == 890
    replace_traffic(billing, range(1, 21), successes=6, failures_server_error=4)
    run()
    assert active(Alert.ERROR_SPIKE, billing).details["calls"] == 200


def test_an_integration_without_limits_has_no_quota_alert(billing):
    traffic(billing, HOUR, successes=100, attempts=100)
    run()
    assert active(Alert.QUOTA, billing) is None


# -- traffic spike -------------------------------------------------------------------------------

def test_a_traffic_spike_fires_above_3x_the_hours_average_and_resolves(billing):
    traffic(billing, range(6, 61), successes=10)
    traffic(billing, RECENT, successes=60)  # 60/min against an hour's average of 14.2/min
    run()
    alert = active(Alert.TRAFFIC_SPIKE, billing)
    assert alert.severity == WARNING and alert.details["factor"] > 3
    run()
    alert.refresh_from_db()
    assert alert.occurrences == 2
    replace_traffic(billing, HOUR, successes=10)
    run()
    alert.refresh_from_db()
    assert alert.status == Alert.RESOLVED


def test_the_first_minutes_of_a_new_integration_are_no_traffic_spike(billing):
    traffic(billing, RECENT, successes=60)
    run()
    assert active(Alert.TRAFFIC_SPIKE, billing) is None


# -- degraded service ----------------------------------------------------------------------------

def test_degraded_service_warns_above_half_served_by_fallbacks_and_escalates_above_70_percent(billing):
    traffic(billing, HOUR, successes=4, rejected_open=6, fallback_value=6)
    run()
    alert = active(Alert.DEGRADED_SERVICE, billing)
    assert (alert.severity, alert.details["fallback_percent"]) == (WARNING, 60.0)
    replace_traffic(billing, HOUR, successes=2, rejected_degraded=8, fallback_cache=4, fallback_last_known=4)
    run()
    alert.refresh_from_db()
    assert alert.severity == CRITICAL and alert.occurrences == 2
    replace_traffic(billing, HOUR, successes=9, failures_network=1, fallback_value=1)
    run()
    alert.refresh_from_db()
    assert alert.status == Alert.RESOLVED


# -- dead letter backlog -------------------------------------------------------------------------

def test_without_the_dead_letter_app_the_backlog_rule_reports_nothing(monkeypatch):
    monkeypatch.setattr(watchdog, "dlq_installed", lambda: False)
    assert watchdog.dlq_backlog(watchdog.thresholds(), NOW) is None


@pytest.mark.skipif(not watchdog.dlq_installed(), reason="the dead letter queue app is not installed")
def test_a_dead_letter_backlog_waiting_over_10_minutes_fires_and_resolves(settings):
    from integrations.dlq.models import DeadLetter

    settings.RESILIENCE_WATCHDOG = {"dlq_pending": 2}
    for age_minutes, status in ((11, "pending"), (12, "retrying"), (30, "pending"), (3, "pending"), (40, "dead")):
        DeadLetter.objects.create(integration_name="billing", handler_name="h", payload={}, status=status,
                                  max_redrives=5, next_attempt_at=NOW,
                                  created_at=NOW - timedelta(minutes=age_minutes))
    run()
    alert = active(Alert.DLQ_BACKLOG)
    assert alert.details["waiting"] == 3 and alert.details["by_integration"] == {"billing": 3}
    DeadLetter.objects.filter(status="retrying").update(status="succeeded")
    run()
    alert.refresh_from_db()
    assert alert.status == Alert.RESOLVED


# -- many alerts in one run ----------------------------------------------------------------------

def test_a_run_raises_escalates_repeats_and_resolves_the_alerts_raising_them_one_by_one_did(monkeypatch):
    """The run writes its alerts in one batch (Alert.raise_or_update_many); the same runs with each alert
    raised in turn by Alert.raise_or_update give the same alerts and the same changes."""
    fleet = [Integration.objects.create(name=f"svc-{i}", slow_call_ms=1_000, hourly_limit=1_000) for i in range(6)]
    spiky, slow, busy, degraded, quota, quiet = fleet

    def runs():
        CallStats.objects.all().delete()
        traffic(spiky, HOUR, successes=6, failures_server_error=4)
        traffic(slow, HOUR, successes=10, latency_le_2500=10)
        traffic(busy, range(6, 61), successes=10)
        traffic(busy, RECENT, successes=60)
        traffic(degraded, HOUR, successes=4, rejected_open=6, fallback_value=6)
        traffic(quota, range(0, 20), successes=1, attempts=40)
        traffic(quiet, HOUR, successes=10)
        yield run()
        replace_traffic(spiky, HOUR, successes=2, failures_timeout=8)  # escalates
        replace_traffic(quota, range(0, 25), successes=1, attempts=40)  # 1,000: escalates
        replace_traffic(slow, HOUR, successes=10)  # resolves
        yield run(NOW + timedelta(minutes=1))
        yield run(NOW + timedelta(minutes=2))

    def outcome():
        changes = [{change: sorted(Alert.objects.get(pk=pk).kind for pk in pks) for change, pks in
                    report["changes"].items()} for report in runs()]
        alerts = sorted((a.kind, a.integration.name, a.severity, a.status, a.message, a.occurrences, a.details)
                        for a in Alert.objects.select_related("integration"))
        Alert.objects.all().delete()
        return changes, alerts

    at_once = outcome()
    monkeypatch.setattr(Alert, "raise_or_update_many", classmethod(lambda cls, findings, now=None: [
        cls.raise_or_update(f.kind, f.severity, f.message, integration=f.integration, details=f.details, now=now)
        for f in findings]))
    assert outcome() == at_once
    first, second, _ = at_once[0]
    assert first["new"] == sorted([Alert.ERROR_SPIKE, Alert.SLOW_CALLS, Alert.TRAFFIC_SPIKE, Alert.DEGRADED_SERVICE,
                                   Alert.QUOTA])
    assert (second["new"], second["escalated"], second["resolved"]) == (
        [Alert.UNAVAILABLE], [Alert.ERROR_SPIKE, Alert.QUOTA], [Alert.SLOW_CALLS])  # 80 % failures: unavailable too


# -- the report ----------------------------------------------------------------------------------

def test_the_report_is_healthy_then_warning_then_critical(billing):
    report = run()
    assert (report["status"], report["warnings"], report["critical"]) == ("healthy", [], [])
    assert report["generated_at"] == NOW.isoformat()
    traffic(billing, HOUR, successes=6, failures_server_error=4)
    assert run()["status"] == "warning"
    BreakerState.objects.create(integration=billing, state="open", opened_at=NOW - timedelta(minutes=30))
    report = run()
    assert report["status"] == "critical"
    assert [a["kind"] for a in report["critical"]] == ["unavailable"]
    assert [a["kind"] for a in report["warnings"]] == ["error_spike"]
    assert report["critical"][0]["integration"] == "billing"


def test_an_acknowledged_alert_stays_in_the_report_until_it_resolves(billing, django_user_model):
    traffic(billing, HOUR, successes=6, failures_server_error=4)
    run()
    active(Alert.ERROR_SPIKE, billing).acknowledge(django_user_model.objects.create(username="bob"))
    report = watchdog.report(NOW)
    assert report["warnings"][0]["status"] == "acknowledged" and report["warnings"][0]["acknowledged_by"] == "bob"


def test_the_watchdog_leaves_health_check_alerts_to_the_health_checks(billing):
    Alert.raise_or_update(Alert.HEALTH_CHECK, CRITICAL, "down", integration=billing, now=NOW)
    run()
    assert active(Alert.HEALTH_CHECK, billing) is not None


def test_the_thresholds_come_from_settings(billing, settings):
    settings.RESILIENCE_WATCHDOG = {"error_warning_percent": 50}
    traffic(billing, HOUR, successes=6, failures_server_error=4)
    run()
    assert active(Alert.ERROR_SPIKE, billing) is None


def test_the_watchdog_command_prints_the_report(billing, capsys):
    traffic(billing, HOUR, now=django_timezone.now(), successes=6, failures_server_error=4)  # the command runs now
    call_command("watchdog", "--json")
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "warning" and len(report["changes"]["new"]) == 1
    call_command("watchdog")
    out = capsys.readouterr().out
    assert "status: warning" in out and "error_spike" in out and "billing" in out and "(x2, open)" in out
