"""Alerts (dedupe, escalation, acknowledgement, resolution), call statistics summaries, channel rate limits."""

import threading
from datetime import datetime, timedelta, timezone

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from integrations.models import Integration
from monitoring.models import CRITICAL, WARNING, Alert, CallStats, HealthCheck, NotificationChannel
from monitoring.watchdog import Finding

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 1, 5, 12, 30, tzinfo=timezone.utc)


@pytest.fixture
def billing():
    return Integration.objects.create(name="billing")


@pytest.fixture
def operator():
    return get_user_model().objects.create_user("alice", password="x", is_staff=True)


def test_a_repeat_counts_an_occurrence_on_the_one_active_alert(billing):
    first, change = Alert.raise_or_update(Alert.ERROR_SPIKE, WARNING, "35% errors", integration=billing, now=NOW)
    assert change == Alert.NEW
    later = NOW + timedelta(minutes=1)
    again, change = Alert.raise_or_update(Alert.ERROR_SPIKE, WARNING, "40% errors", integration=billing, now=later,
                                          details={"error_percent": 40})
    assert change == Alert.REPEATED and again.pk == first.pk
    again.refresh_from_db()
    assert (again.occurrences, again.first_seen, again.last_seen, again.message) == (2, NOW, later, "40% errors")
    assert again.details == {"error_percent": 40}
    assert Alert.objects.count() == 1


def test_the_same_kind_on_another_integration_is_another_alert(billing):
    search = Integration.objects.create(name="search")
    Alert.raise_or_update(Alert.ERROR_SPIKE, WARNING, "x", integration=billing, now=NOW)
    Alert.raise_or_update(Alert.ERROR_SPIKE, WARNING, "x", integration=search, now=NOW)
    Alert.raise_or_update(Alert.SLOW_CALLS, WARNING, "x", integration=billing, now=NOW)
    assert Alert.objects.active().count() == 3


def test_a_worse_severity_escalates_and_a_milder_one_does_not_de_escalate(billing):
    alert, _ = Alert.raise_or_update(Alert.ERROR_SPIKE, WARNING, "35%", integration=billing, now=NOW)
    _, change = Alert.raise_or_update(Alert.ERROR_SPIKE, CRITICAL, "80%", integration=billing, now=NOW)
    assert change == Alert.ESCALATED
    _, change = Alert.raise_or_update(Alert.ERROR_SPIKE, WARNING, "35%", integration=billing, now=NOW)
    assert change == Alert.REPEATED
    alert.refresh_from_db()
    assert (alert.severity, alert.occurrences) == (CRITICAL, 3)


def test_escalation_reopens_an_acknowledged_alert(billing, operator):
    alert, _ = Alert.raise_or_update(Alert.QUOTA, WARNING, "85%", integration=billing, now=NOW)
    assert alert.acknowledge(operator, now=NOW)
    Alert.raise_or_update(Alert.QUOTA, WARNING, "88%", integration=billing, now=NOW)
    alert.refresh_from_db()
    assert alert.status == Alert.ACKNOWLEDGED
    Alert.raise_or_update(Alert.QUOTA, CRITICAL, "97%", integration=billing, now=NOW)
    alert.refresh_from_db()
    assert (alert.status, alert.severity, alert.acknowledged_by) == (Alert.OPEN, CRITICAL, operator)


def test_acknowledging_records_who_and_when_once(billing, operator):
    alert, _ = Alert.raise_or_update(Alert.QUOTA, WARNING, "85%", integration=billing, now=NOW)
    assert alert.acknowledge(operator, now=NOW)
    assert not alert.acknowledge(operator, now=NOW + timedelta(minutes=5))
    alert.refresh_from_db()
    assert (alert.status, alert.acknowledged_by, alert.acknowledged_at) == (Alert.ACKNOWLEDGED, operator, NOW)


def test_a_resolved_alert_is_resolved_once_and_a_new_condition_raises_a_new_alert(billing, operator):
    alert, _ = Alert.raise_or_update(Alert.UNAVAILABLE, CRITICAL, "down", integration=billing, now=NOW)
    assert alert.resolve("resolved by an operator", by=operator, now=NOW)
    assert not alert.resolve(now=NOW)
    alert.refresh_from_db()
    assert (alert.status, alert.resolved_at, alert.resolution) == (
        Alert.RESOLVED, NOW, "resolved by an operator (by alice)")
    fresh, change = Alert.raise_or_update(Alert.UNAVAILABLE, CRITICAL, "down again", integration=billing, now=NOW)
    assert change == Alert.NEW and fresh.pk != alert.pk


def test_the_database_refuses_a_second_active_alert_of_a_kind_even_site_wide():
    common = dict(kind=Alert.DLQ_BACKLOG, severity=WARNING, message="backlog", first_seen=NOW, last_seen=NOW)
    Alert.objects.create(**common)
    with pytest.raises(IntegrityError), transaction.atomic():
        Alert.objects.create(**common)
    Alert.objects.create(**common, status=Alert.RESOLVED)  # history is not limited


def test_an_unknown_severity_is_refused(billing):
    with pytest.raises(ValueError, match="severity"):
        Alert.raise_or_update(Alert.QUOTA, "bad", "x", integration=billing)


def test_open_counts_by_severity_list_every_severity(billing, operator):
    Alert.raise_or_update(Alert.QUOTA, CRITICAL, "x", integration=billing, now=NOW)
    acknowledged, _ = Alert.raise_or_update(Alert.ERROR_SPIKE, WARNING, "x", integration=billing, now=NOW)
    acknowledged.acknowledge(operator)
    resolved, _ = Alert.raise_or_update(Alert.SLOW_CALLS, WARNING, "x", integration=billing, now=NOW)
    resolved.resolve()
    assert Alert.objects.open_counts_by_severity() == {WARNING: 1, CRITICAL: 1}
    Alert.objects.all().delete()
    assert Alert.objects.open_counts_by_severity() == {WARNING: 0, CRITICAL: 0}


def at_once(work, threads):
    """Run ``work`` in that many threads started together, each on its own database connection."""
    start = threading.Barrier(threads)

    def worker():
        start.wait()
        try:
            work()
        finally:
            connection.close()

    running = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(60)


# -- many alerts at once (the watchdog's path) -----------------------------------------------------

def one_by_one(findings, now):
    return [Alert.raise_or_update(f.kind, f.severity, f.message, integration=f.integration, details=f.details,
                                  now=now) for f in findings]


def alert_rows():
    return sorted((a.kind, a.integration_id, a.severity, a.status, a.message, a.details, a.occurrences,
                   a.first_seen, a.last_seen, a.acknowledged_by_id) for a in Alert.objects.all())


def mixed_batches(billing, search, operator):
    """Batches that take every branch: new, repeated, escalated, escalated after an acknowledgement,
    a milder repeat, a site-wide alert, and the same alert twice in one batch (new, then escalated)."""
    return [
        [Finding(Alert.ERROR_SPIKE, WARNING, "35%", billing, {"error_percent": 35}),
         Finding(Alert.QUOTA, WARNING, "85%", billing), Finding(Alert.SLOW_CALLS, CRITICAL, "slow", search),
         Finding(Alert.DLQ_BACKLOG, WARNING, "backlog")],
        lambda: Alert.objects.get(kind=Alert.QUOTA).acknowledge(operator, now=NOW),
        [Finding(Alert.ERROR_SPIKE, CRITICAL, "80%", billing, {"error_percent": 80}),
         Finding(Alert.QUOTA, CRITICAL, "97%", billing), Finding(Alert.SLOW_CALLS, WARNING, "milder", search),
         Finding(Alert.DLQ_BACKLOG, WARNING, "backlog 2"), Finding(Alert.TRAFFIC_SPIKE, WARNING, "x3", search),
         Finding(Alert.TRAFFIC_SPIKE, CRITICAL, "x9", search)],
    ]


def test_raising_many_at_once_gives_the_alerts_changes_and_notifications_of_raising_each_in_turn(
        billing, operator, django_capture_on_commit_callbacks):
    from monitoring.models import alert_event

    search = Integration.objects.create(name="search")
    events = []

    def receiver(sender, alert_id, event, **kwargs):
        alert = Alert.objects.get(pk=alert_id)
        events.append((alert.kind, alert.integration_id, event))

    alert_event.connect(receiver, dispatch_uid="test-many")
    try:
        outcomes = {}
        for name, raise_all in (("in turn", one_by_one), ("at once", Alert.raise_or_update_many)):
            Alert.objects.all().delete()
            events.clear()
            changes = []
            for minute, step in enumerate(mixed_batches(billing, search, operator)):
                if callable(step):
                    step()
                    continue
                with django_capture_on_commit_callbacks(execute=True):
                    changes += [(alert.kind, alert.integration_id, change)
                                for alert, change in raise_all(step, now=NOW + timedelta(minutes=minute))]
            outcomes[name] = (alert_rows(), changes, list(events))
    finally:
        alert_event.disconnect(dispatch_uid="test-many")
    assert outcomes["at once"] == outcomes["in turn"]
    rows, changes, events = outcomes["at once"]
    assert (Alert.TRAFFIC_SPIKE, search.pk, Alert.ESCALATED) in changes and len(rows) == 5
    assert (Alert.QUOTA, billing.pk, Alert.ESCALATED) in events


def test_raising_many_reads_once_inserts_once_and_updates_once(billing):
    search = Integration.objects.create(name="search")
    Alert.raise_or_update_many([Finding(Alert.QUOTA, WARNING, "85%", billing)], now=NOW)
    findings = [Finding(Alert.QUOTA, WARNING, "86%", billing), Finding(Alert.QUOTA, WARNING, "80%", search),
                Finding(Alert.ERROR_SPIKE, WARNING, "35%", billing), Finding(Alert.ERROR_SPIKE, WARNING, "31%", search)]
    with CaptureQueriesContext(connection) as queries:
        Alert.raise_or_update_many(findings, now=NOW)
    statements = [q["sql"].split()[0] for q in queries.captured_queries
                  if not q["sql"].startswith(("SAVEPOINT", "RELEASE", "BEGIN", "COMMIT"))]
    assert statements == ["SELECT", "INSERT", "UPDATE"]


def test_an_alert_another_process_raised_meanwhile_is_repeated_not_duplicated(billing, monkeypatch):
    """The rival's alert was committed after our read of the active alerts (which did not see it) and
    before our insert: the constraint refuses ours, and every finding goes through raise_or_update."""
    from monitoring.models import AlertQuerySet

    search = Integration.objects.create(name="search")
    Alert.objects.create(kind=Alert.QUOTA, severity=WARNING, integration=billing, message="rival's",
                         first_seen=NOW, last_seen=NOW)
    active, reads = AlertQuerySet.active, []

    def before_the_rival(queryset):
        reads.append(1)
        return queryset.none() if len(reads) == 1 else active(queryset)

    monkeypatch.setattr(AlertQuerySet, "active", before_the_rival)
    outcomes = Alert.raise_or_update_many([Finding(Alert.QUOTA, CRITICAL, "97%", billing),
                                           Finding(Alert.QUOTA, WARNING, "81%", search)], now=NOW)
    assert [change for _, change in outcomes] == [Alert.ESCALATED, Alert.NEW]
    quota = Alert.objects.active().get(kind=Alert.QUOTA, integration=billing)
    assert (quota.occurrences, quota.severity, quota.message) == (2, CRITICAL, "97%")
    assert Alert.objects.count() == 2


def test_raising_many_refuses_an_unknown_severity_before_writing_anything(billing):
    with pytest.raises(ValueError, match="severity 'bad'"):
        Alert.raise_or_update_many([Finding(Alert.QUOTA, WARNING, "ok", billing), Finding(Alert.QUOTA, "bad", "x")])
    assert not Alert.objects.exists()


@pytest.mark.skipif(django_settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"),
                    reason="needs a database with concurrent writers: set DATABASE_URL to PostgreSQL")
@pytest.mark.django_db(transaction=True)
def test_two_watchdogs_raising_the_same_alerts_at_once_end_with_one_alert_each():
    integrations = [Integration.objects.create(name=f"svc-{i}") for i in range(20)]
    changes = []

    def watchdog():
        outcomes = Alert.raise_or_update_many(
            [Finding(Alert.ERROR_SPIKE, WARNING, "35%", integration) for integration in integrations], now=NOW)
        changes.extend(change for _, change in outcomes)

    at_once(watchdog, 2)
    assert sorted(changes) == sorted([Alert.NEW] * 20 + [Alert.REPEATED] * 20)
    assert Alert.objects.count() == 20 and set(Alert.objects.values_list("occurrences", flat=True)) == {2}


def test_call_statistics_sum_by_integration_with_rates_and_percentiles(billing):
    search = Integration.objects.create(name="search")
    CallStats.objects.create(integration=billing, minute=NOW, calls=10, successes=6, failures_timeout=2,
                             rejected_open=2, fallback_value=3, latency_le_100=8, latency_sum_ms=400)
    CallStats.objects.create(integration=billing, minute=NOW + timedelta(minutes=1), calls=10, successes=10,
                             latency_le_100=10, latency_sum_ms=500)
    CallStats.objects.create(integration=search, minute=NOW, calls=1, successes=1)
    summary = CallStats.objects.filter(integration=billing).totals()
    assert (summary["calls"], summary["errors"], summary["rejected"], summary["fallbacks"]) == (20, 2, 2, 3)
    assert summary["error_rate"] == pytest.approx(2 / 18)
    assert summary["latency_avg_ms"] == pytest.approx(50)
    assert 50 < summary["latency_p50_ms"] < summary["latency_p99_ms"] <= 100
    by_integration = CallStats.objects.between(NOW, NOW + timedelta(minutes=1)).totals_by_integration()
    assert {pk: totals["calls"] for pk, totals in by_integration.items()} == {billing.pk: 10, search.pk: 1}


def test_a_health_check_is_due_once_its_interval_has_passed(billing):
    check = HealthCheck.objects.create(integration=billing, url="http://127.0.0.1:1/", interval_s=120)
    assert HealthCheck.objects.due(NOW) == [check]
    HealthCheck.objects.filter(pk=check.pk).update(last_checked_at=NOW)
    assert HealthCheck.objects.due(NOW + timedelta(seconds=119)) == []
    assert HealthCheck.objects.due(NOW + timedelta(seconds=120)) == [check]


def test_only_one_worker_claims_a_due_health_check(billing):
    check = HealthCheck.objects.create(integration=billing, url="http://127.0.0.1:1/")
    other_worker = HealthCheck.objects.get(pk=check.pk)
    assert check.claim(NOW)
    assert not other_worker.claim(NOW)


def test_a_channel_is_an_integration_of_its_own():
    channel = NotificationChannel.objects.create(name="ops", kind=NotificationChannel.WEBHOOK,
                                                 url="https://hooks.example/ops")
    assert channel.integration.name == "notify.ops"
    assert len(channel.secret) == 64


def test_a_channel_takes_at_most_its_hourly_cap_per_hour():
    channel = NotificationChannel.objects.create(name="ops", kind=NotificationChannel.EMAIL,
                                                 emails="ops@example.com", hourly_cap=2)
    assert [channel.claim_slot(NOW) for _ in range(3)] == [True, True, False]
    assert channel.claim_slot(NOW + timedelta(hours=1))
    channel.refresh_from_db()
    assert channel.sent_in_window == 1


def test_a_channels_window_is_its_own_length_and_3600_s_is_the_utc_hour():
    hourly = NotificationChannel(name="hourly", kind=NotificationChannel.EMAIL)
    assert hourly.window_start_for(NOW) == NOW.replace(minute=0)
    five_minutes = NotificationChannel(name="fast", kind=NotificationChannel.EMAIL, rate_window_s=300)
    assert five_minutes.window_start_for(NOW + timedelta(minutes=4, seconds=59)) == NOW
    assert five_minutes.window_start_for(NOW + timedelta(minutes=5)) == NOW + timedelta(minutes=5)


def test_a_channel_takes_at_most_its_rate_limit_per_window():
    channel = NotificationChannel.objects.create(name="ops", kind=NotificationChannel.EMAIL,
                                                 emails="ops@example.com", rate_limit=2, rate_window_s=60)
    assert [channel.claim_slot(NOW + timedelta(seconds=s)) for s in (0, 30, 59)] == [True, True, False]
    assert [channel.claim_slot(NOW + timedelta(seconds=s)) for s in (60, 61, 62)] == [True, True, False]


def test_a_slot_after_suppressed_ones_says_how_many_and_the_count_starts_again():
    channel = NotificationChannel.objects.create(name="ops", kind=NotificationChannel.EMAIL,
                                                 emails="ops@example.com", rate_limit=1, rate_window_s=60)
    slots = [channel.take_slot(NOW) for _ in range(4)]
    assert [(bool(slot), slot.suppressed_before) for slot in slots] == [(True, 0), (False, 0), (False, 0),
                                                                         (False, 0)]
    later = channel.take_slot(NOW + timedelta(seconds=60))
    assert (bool(later), later.suppressed_before) == (True, 3)
    channel.refresh_from_db()
    assert channel.suppressed == 0
    assert channel.take_slot(NOW + timedelta(seconds=120)).suppressed_before == 0


@pytest.mark.skipif(django_settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"),
                    reason="needs a database with concurrent writers: set DATABASE_URL to PostgreSQL")
@pytest.mark.django_db(transaction=True)
def test_senders_at_once_never_pass_the_limit_nor_report_a_suppressed_one_twice():
    channel = NotificationChannel.objects.create(name="ops", kind=NotificationChannel.EMAIL,
                                                 emails="ops@example.com", rate_limit=3, rate_window_s=60)
    slots = []

    def sender():
        slots.extend([NotificationChannel.objects.get(pk=channel.pk).take_slot(NOW) for _ in range(5)])

    at_once(sender, 6)
    assert len(slots) == 30 and sum(map(bool, slots)) == 3
    after = channel.take_slot(NOW + timedelta(seconds=60))
    assert sum(slot.suppressed_before for slot in slots) + after.suppressed_before == 27


def test_hourly_cap_is_the_old_name_of_rate_limit():
    channel = NotificationChannel(name="ops", kind=NotificationChannel.EMAIL, hourly_cap=7)
    assert (channel.rate_limit, channel.hourly_cap, channel.rate_window_s) == (7, 7, 3600)


@pytest.mark.parametrize("fields, field, wanted", [
    ({"kind": NotificationChannel.SLACK, "url": ""}, "url", "A Slack channel needs its incoming webhook's URL."),
    ({"kind": NotificationChannel.SLACK, "url": "http://hooks.slack.com/services/T0/B0/x"}, "url",
     "A Slack channel's URL must use https"),
    ({"kind": NotificationChannel.WEBHOOK, "url": ""}, "url", "A webhook channel needs a URL."),
    ({"kind": NotificationChannel.EMAIL, "emails": ""}, "emails", "needs at least one recipient"),
    ({"rate_limit": 0}, "rate_limit", "greater than or equal to 1"),
    ({"rate_window_s": 0}, "rate_window_s", "greater than or equal to 1"),
])
def test_a_bad_channel_is_refused_naming_the_field(fields, field, wanted):
    channel = NotificationChannel(**{"name": "ops", "kind": NotificationChannel.EMAIL, "emails": "a@example.com",
                                     **fields})
    with pytest.raises(ValidationError) as info:
        channel.full_clean()
    assert list(info.value.message_dict) == [field]
    assert wanted in " ".join(info.value.message_dict[field])
    assert channel.configuration_error().startswith(f"{field}: ")


def test_slack_may_be_plain_http_only_on_this_host():
    for url in ("https://hooks.slack.com/services/T0/B0/x", "http://127.0.0.1:8081/services/T0/B0/x"):
        assert NotificationChannel(name="ops", kind=NotificationChannel.SLACK, url=url).configuration_error() is None


@pytest.mark.parametrize("field", ["rate_limit", "rate_window_s"])
def test_the_database_refuses_a_zero_rate_limit_or_window_from_code_that_skips_validation(field):
    with pytest.raises(IntegrityError, match=f"notification_channel_{field}_at_least_1"), transaction.atomic():
        NotificationChannel.objects.create(name="ops", kind=NotificationChannel.EMAIL, emails="a@example.com",
                                           **{field: 0})


def test_a_channel_filters_by_minimum_severity():
    channel = NotificationChannel(name="pager", kind=NotificationChannel.EMAIL, min_severity=CRITICAL)
    assert channel.accepts(CRITICAL) and not channel.accepts(WARNING)
    channel.enabled = False
    assert not channel.accepts(CRITICAL)
