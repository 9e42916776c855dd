"""User-defined watchdog rules on business metrics (monitoring/rules.py): registration and its errors,
settings-declared rules and theirs, and each watchdog run raising, escalating, repeating and resolving
their alerts like the built-in ones (notifications included), per integration, with a failing metric."""

import logging
from datetime import datetime, timedelta, timezone

import pytest
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.urls import reverse

import rules_support
from dlq_support import enqueue
from integrations.models import Integration
from monitoring import rules, watchdog
from monitoring.conf import monitoring_settings
from monitoring.models import CRITICAL, WARNING, Alert, NotificationChannel

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_stats_buffer")]

NOW = datetime(2026, 1, 5, 12, 30, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def registry():
    """Each test starts with no registered metric or rule, and leaves none behind."""
    saved = dict(rules._metrics), dict(rules._rules)
    rules._metrics.clear()
    rules._rules.clear()
    rules_support.VALUES.update(site=None, by_integration={})
    yield
    rules._metrics.clear()
    rules._rules.clear()
    rules._metrics.update(saved[0])
    rules._rules.update(saved[1])


@pytest.fixture
def fraud_rate():
    rules.register_metric("fraud_rate", rules_support.site_value, description="Payments flagged, last hour",
                          unit="%")
    return rules.register_rule("fraud_rate_high", metric="fraud_rate", warning=50, critical=70,
                               description="Too many payments flagged as fraud")


def active(kind, integration=None):
    return Alert.objects.active().filter(kind=kind, integration=integration).first()


def rule_result(report, name):
    return next(result for result in report["rules"] if result["name"] == name)


# -- registration --------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, field_name", [
    ({"warning": 80, "critical": 70}, "'warning' (80) must not be above 'critical' (70)"),
    ({"warning": 30, "critical": 50, "direction": "below"}, "'warning' (30) must not be below 'critical' (50)"),
    ({"warning": 50, "direction": "sideways"}, "'direction' must be 'above' or 'below'"),
    ({}, "'warning' or 'critical' must be set"),
    ({"warning": "50"}, "'warning' must be a number"),
    ({"critical": float("nan")}, "'critical' must be a number"),
    ({"warning": 1, "min_samples": -1}, "'min_samples' must be a whole number"),
    ({"warning": 1, "description": 3}, "'description' must be a string"),
])
def test_a_bad_rule_is_refused_naming_its_field(fields, field_name):
    rules.register_metric("fraud_rate", rules_support.site_value)
    with pytest.raises(ImproperlyConfigured) as raised:
        rules.register_rule("fraud_rate_high", metric="fraud_rate", **fields)
    assert str(raised.value).startswith("watchdog rule 'fraud_rate_high': " + field_name)
    assert watchdog.all_rules() == []


def test_a_rule_names_a_registered_metric_an_importable_function_or_a_function():
    with pytest.raises(ImproperlyConfigured, match=r"'metric' must be a registered metric \(registered: none\)"):
        rules.register_rule("r1", metric="fraud_rate", warning=1)
    with pytest.raises(ImproperlyConfigured, match=r"'metric' cannot be imported: .*no_such_module"):
        rules.register_rule("r2", metric="no_such_module.rate", warning=1)
    with pytest.raises(ImproperlyConfigured, match=r"'metric' names 42, which is not a function"):
        rules.register_rule("r3", metric="rules_support.NOT_A_FUNCTION", warning=1)
    by_path = rules.register_rule("r4", metric="rules_support.site_value", warning=1)
    by_function = rules.register_rule("r5", metric=rules_support.site_value, warning=1)
    assert by_path.metric.fn is by_function.metric.fn is rules_support.site_value
    assert [rule.name for rule in watchdog.all_rules()] == ["r4", "r5"]


def test_bad_names_functions_and_duplicates_are_refused():
    with pytest.raises(ImproperlyConfigured, match=r"^metric 'fraud rate': 'name' must be letters"):
        rules.register_metric("fraud rate", rules_support.site_value)
    with pytest.raises(ImproperlyConfigured, match=r"^metric 'fraud_rate': 'fn' must be a function"):
        rules.register_metric("fraud_rate", 42)
    rules.register_metric("fraud_rate", rules_support.site_value)
    rules.register_metric("fraud_rate", rules_support.site_value)  # the same again: a no-op (ready() twice)
    with pytest.raises(ImproperlyConfigured, match=r"'name' is already registered with another function"):
        rules.register_metric("fraud_rate", rules_support.by_integration)
    with pytest.raises(ImproperlyConfigured, match=r"^watchdog rule 'x' \* 65: 'name' must be letters"
                       .replace("'x' \\* 65", "'" + "x" * 65 + "'")):
        rules.register_rule("x" * 65, metric="fraud_rate", warning=1)
    rules.register_rule("fraud_rate_high", metric="fraud_rate", warning=1)
    with pytest.raises(ImproperlyConfigured, match=r"'name' is already registered"):
        rules.register_rule("fraud_rate_high", metric="fraud_rate", warning=2)


# -- settings ------------------------------------------------------------------------------------

def check_messages():
    return [error.msg for error in monitoring_settings.check()]


@pytest.mark.parametrize("value, message", [
    ({"name": "x"}, "RESILIENCE_WATCHDOG_RULES must be a list of rules"),
    (["fraud"], "RESILIENCE_WATCHDOG_RULES[0] must be a dict"),
    ([{"metric": "rules_support.site_value", "warning": 1}], "RESILIENCE_WATCHDOG_RULES[0]['name'] is required."),
    ([{"name": "a", "metric": "rules_support.site_value", "warning": 1, "treshold": 2}],
     "RESILIENCE_WATCHDOG_RULES[0]['treshold'] is not a rule field"),
    ([{"name": "a", "metric": "rules_support.site_value", "warning": 1},
      {"name": "b", "metric": "rules_support.site_value", "warning": 80, "critical": 70}],
     "RESILIENCE_WATCHDOG_RULES[1]['warning'] (80) must not be above 'critical' (70) for direction 'above'."),
    ([{"name": "a", "metric": "rules_support.site_value", "warning": 1, "direction": "up"}],
     "RESILIENCE_WATCHDOG_RULES[0]['direction'] must be 'above' or 'below'; got 'up'."),
    ([{"name": "a", "metric": "shop.metrics.fraud_rate", "warning": 1}],
     "RESILIENCE_WATCHDOG_RULES[0]['metric'] cannot be imported: No module named 'shop'"),
    ([{"name": "a", "metric": "rules_support.site_value", "warning": 1},
      {"name": "a", "metric": "rules_support.site_value", "warning": 2}],
     "RESILIENCE_WATCHDOG_RULES[1]['name'] 'a' is declared twice."),
])
def test_bad_settings_rules_fail_the_check_naming_the_field(settings, value, message):
    settings.RESILIENCE_WATCHDOG_RULES = value
    [error] = check_messages()
    assert error.startswith(message)
    with pytest.raises(ImproperlyConfigured, match="^RESILIENCE_WATCHDOG_RULES"):
        watchdog.run(now=NOW)  # a run refuses them too: no rule is silently left out


def test_a_settings_rule_on_a_real_table_raises_and_resolves(settings):
    settings.RESILIENCE_WATCHDOG_RULES = [{
        "name": "dead_share", "metric": "rules_support.dead_share", "warning": 20, "critical": 50, "unit": "%",
        "description": "Dead letters of the last hour that are dead"}]
    assert check_messages() == []
    report = watchdog.run(now=NOW)
    assert rule_result(report, "dead_share")["state"] == rules.NO_DATA  # no dead letter at all
    entries = [enqueue(integration="billing") for _ in range(4)]
    now = entries[0].created_at + timedelta(seconds=1)
    entries[0].__class__.objects.filter(pk=entries[0].pk).update(status="dead")
    report = watchdog.run(now=now)
    alert = active("rule:dead_share")
    assert (alert.severity, alert.details["value"], alert.details["unit"]) == (WARNING, 25.0, "%")
    assert alert.message == "dead_share: 25% above the warning level of 20%"
    assert rule_result(report, "dead_share") | {"values": None} == {
        "name": "dead_share", "kind": "rule:dead_share", "metric": "rules_support.dead_share",
        "description": "Dead letters of the last hour that are dead", "unit": "%", "warning": 20, "critical": 50,
        "direction": "above", "min_samples": 0, "state": "warning", "error": None, "values": None}
    entries[0].__class__.objects.filter(pk=entries[0].pk).update(status="succeeded")
    watchdog.run(now=now)
    alert.refresh_from_db()
    assert alert.status == Alert.RESOLVED


def test_a_name_both_registered_and_declared_is_refused(settings, fraud_rate):
    settings.RESILIENCE_WATCHDOG_RULES = [{"name": "fraud_rate_high", "metric": "fraud_rate", "warning": 1}]
    with pytest.raises(ImproperlyConfigured, match="declares 'fraud_rate_high', which is also registered"):
        watchdog.run(now=NOW)


# -- raised, escalated, repeated and resolved like the built-in rules ---------------------------

def test_a_rule_raises_repeats_escalates_and_resolves_with_notifications(fraud_rate,
                                                                          django_capture_on_commit_callbacks):
    NotificationChannel.objects.create(name="oncall", kind=NotificationChannel.EMAIL, emails="ops@example.com")
    values = rules_support.VALUES

    def run(value, minutes):
        values["site"] = value
        with django_capture_on_commit_callbacks(execute=True):
            return watchdog.run(now=NOW + timedelta(minutes=minutes))

    report = run(40, 0)
    assert active("rule:fraud_rate_high") is None and rule_result(report, "fraud_rate_high")["state"] == "healthy"
    report = run(55, 1)
    alert = active("rule:fraud_rate_high")
    assert (alert.severity, alert.integration, alert.occurrences) == (WARNING, None, 1)
    assert report["changes"]["new"] == [alert.pk] and report["status"] == WARNING
    assert alert.details == {"rule": "fraud_rate_high", "metric": "fraud_rate", "value": 55, "samples": None,
                             "warning": 50, "critical": 70, "direction": "above", "unit": "%"}
    report = run(60, 2)
    alert.refresh_from_db()
    assert alert.occurrences == 2 and report["changes"]["repeated"] == [alert.pk]
    report = run(75, 3)
    alert.refresh_from_db()
    assert (alert.severity, alert.occurrences) == (CRITICAL, 3) and report["changes"]["escalated"] == [alert.pk]
    assert alert.message == "fraud_rate_high: 75% above the critical level of 70%"
    report = run(50, 4)  # back to the warning level: not above it
    alert.refresh_from_db()
    assert alert.status == Alert.RESOLVED and report["changes"]["resolved"] == [alert.pk]
    assert [message.subject for message in mail.outbox] == [
        "[WARNING] rule:fraud_rate_high", "[CRITICAL] escalated: rule:fraud_rate_high",
        "[CRITICAL] resolved: rule:fraud_rate_high"]
    assert Alert.objects.filter(kind="rule:fraud_rate_high").count() == 1


def test_a_below_rule_fires_under_its_levels_and_no_data_resolves():
    rules.register_metric("enrichment_rate", rules_support.site_value, unit="%")
    rules.register_rule("enrichment_low", metric="enrichment_rate", warning=50, critical=30, direction="below")
    for value, severity in ((60, None), (50, None), (45, WARNING), (20, CRITICAL)):
        rules_support.VALUES["site"] = value
        watchdog.run(now=NOW)
        alert = active("rule:enrichment_low")
        assert (alert.severity if alert else None) == severity, value
    rules_support.VALUES["site"] = None  # no data now: like a built-in rule under min_calls, it clears
    report = watchdog.run(now=NOW)
    assert active("rule:enrichment_low") is None and rule_result(report, "enrichment_low")["state"] == "no_data"


def test_min_samples_needs_measures_with_enough_samples():
    rules.register_metric("fraud_rate", rules_support.site_value)
    rules.register_rule("fraud_rate_high", metric="fraud_rate", warning=50, min_samples=20)
    rules_support.VALUES["site"] = rules.Measure(90, 19)
    report = watchdog.run(now=NOW)
    assert active("rule:fraud_rate_high") is None
    assert rule_result(report, "fraud_rate_high")["values"] == [
        {"integration": None, "value": 90, "samples": 19, "severity": None}]
    rules_support.VALUES["site"] = rules.Measure(90, 20)
    watchdog.run(now=NOW)
    assert active("rule:fraud_rate_high").details["samples"] == 20
    rules_support.VALUES["site"] = 90  # a plain number cannot say how many samples it has
    report = watchdog.run(now=NOW)
    assert rule_result(report, "fraud_rate_high")["error"].startswith("ValueError: the rule needs min_samples=20")
    assert active("rule:fraud_rate_high") is not None  # an erroring rule leaves its alert as it is


def test_per_integration_values_raise_one_alert_per_integration():
    billing = Integration.objects.create(name="billing")
    search = Integration.objects.create(name="search")
    rules.register_metric("enrichment_rate", rules_support.by_integration, unit="%")
    rules.register_rule("enrichment_low", metric="enrichment_rate", warning=50, critical=30, direction="below")
    rules.register_rule("enrichment_very_low", metric="enrichment_rate", critical=10, direction="below")
    rules_support.VALUES["by_integration"] = {"billing": 40, "search": 20, None: 90}
    report = watchdog.run(now=NOW)
    assert active("rule:enrichment_low", billing).severity == WARNING
    assert active("rule:enrichment_low", search).severity == CRITICAL
    assert active("rule:enrichment_low") is None and active("rule:enrichment_very_low", search) is None
    result = rule_result(report, "enrichment_low")
    assert result["state"] == "critical"
    assert result["values"] == [{"integration": "billing", "value": 40, "samples": None, "severity": WARNING},
                                {"integration": "search", "value": 20, "samples": None, "severity": CRITICAL},
                                {"integration": None, "value": 90, "samples": None, "severity": None}]
    rules_support.VALUES["by_integration"] = {"billing": 70, "search": 5}
    watchdog.run(now=NOW + timedelta(minutes=1))
    assert active("rule:enrichment_low", billing) is None
    assert active("rule:enrichment_low", search).occurrences == 2
    assert active("rule:enrichment_very_low", search).severity == CRITICAL


def test_a_value_for_an_unknown_integration_or_not_a_number_makes_the_rule_erroring():
    rules.register_metric("enrichment_rate", rules_support.by_integration)
    rules.register_rule("enrichment_low", metric="enrichment_rate", warning=50, direction="below")
    rules_support.VALUES["by_integration"] = {"nowhere": 10}
    report = watchdog.run(now=NOW)
    assert rule_result(report, "enrichment_low")["error"] == (
        "ValueError: the metric gave a value for 'nowhere', which is no integration")
    Integration.objects.create(name="nowhere")
    rules_support.VALUES["by_integration"] = {"nowhere": "ten"}
    report = watchdog.run(now=NOW)
    assert rule_result(report, "enrichment_low")["error"] == (
        "ValueError: the metric gave integration 'nowhere' a value that is not a finite number: 'ten'")


def test_a_failing_metric_is_logged_and_shown_and_the_other_rules_still_run(fraud_rate, caplog):
    rules.register_metric("payments_broken", rules_support.broken)
    rules.register_rule("broken_rule", metric="payments_broken", warning=1)
    Alert.raise_or_update("rule:broken_rule", WARNING, "broken_rule: 2 above the warning level of 1", now=NOW)
    billing = Integration.objects.create(name="billing", hourly_limit=10)
    from monitoring.models import CallStats

    CallStats.objects.create(integration=billing, minute=NOW - timedelta(minutes=1), calls=10, attempts=10,
                             successes=10)
    rules_support.VALUES["site"] = 80
    with caplog.at_level(logging.ERROR, logger="monitoring.watchdog"):
        report = watchdog.run(now=NOW)
    broken = rule_result(report, "broken_rule")
    assert (broken["state"], broken["error"], broken["values"]) == (
        "error", "ZeroDivisionError: no payments table yet", [])
    [record] = [r for r in caplog.records if r.name == "monitoring.watchdog"]
    assert "watchdog rule 'broken_rule'" in record.getMessage() and record.exc_info[0] is ZeroDivisionError
    assert active("rule:fraud_rate_high").severity == CRITICAL  # the other user rule ran
    assert active(Alert.QUOTA, billing).severity == CRITICAL  # and the built-in ones
    assert active("rule:broken_rule").occurrences == 1  # not resolved: its condition is unknown, not cleared


def test_a_failing_metric_raises_a_warning_of_its_own_until_the_metric_works_again(fraud_rate):
    rules_support.VALUES["site"] = 60
    watchdog.run(now=NOW)
    assert active("rule:fraud_rate_high").severity == WARNING
    rules_support.VALUES["site"] = "n/a"  # the metric breaks: the rule watches nothing
    for minutes in (1, 2):
        report = watchdog.run(now=NOW + timedelta(minutes=minutes))
    failing = active("rule:fraud_rate_high:error")
    assert (failing.severity, failing.integration, failing.occurrences) == (WARNING, None, 2)
    assert failing.message == ("fraud_rate_high: its metric 'fraud_rate' failed, so the rule watches nothing: "
                               "ValueError: the metric gave the site a value that is not a finite number: 'n/a'")
    assert failing.details == {"rule": "fraud_rate_high", "metric": "fraud_rate",
                               "error": rule_result(report, "fraud_rate_high")["error"]}
    assert active("rule:fraud_rate_high").occurrences == 1  # its condition's alert is left as it was
    assert [a["kind"] for a in report["warnings"]] == ["rule:fraud_rate_high", "rule:fraud_rate_high:error"]
    rules_support.VALUES["site"] = 10  # working again, and healthy: both resolve
    report = watchdog.run(now=NOW + timedelta(minutes=3))
    assert active("rule:fraud_rate_high:error") is None and active("rule:fraud_rate_high") is None
    assert Alert.objects.get(kind="rule:fraud_rate_high:error").status == Alert.RESOLVED


# -- where they are shown ------------------------------------------------------------------------

def test_the_report_api_and_the_command_show_the_rules(fraud_rate, admin_client, capsys):
    rules_support.VALUES["site"] = 60
    response = admin_client.post("/api/watchdog/run/")
    assert response.status_code == 200
    [result] = response.json()["rules"]
    assert (result["name"], result["state"], result["values"][0]["value"]) == ("fraud_rate_high", "warning", 60)
    [alert] = response.json()["warnings"]
    assert alert["kind"] == "rule:fraud_rate_high"
    rules_support.VALUES["site"] = 90  # the report reads the metric now
    [result] = admin_client.get("/api/watchdog/report/").json()["rules"]
    assert (result["state"], result["values"][0]["value"], result["warning"], result["critical"]) == (
        "critical", 90, 50, 70)
    listed = admin_client.get("/api/alerts/", {"kind": "rule:fraud_rate_high"}).json()
    assert [a["kind"] for a in listed["results"]] == ["rule:fraud_rate_high"]
    refused = admin_client.get("/api/alerts/", {"kind": "fraud"})
    assert refused.status_code == 400 and "kind" in refused.content.decode()
    call_command("watchdog", "--json")
    assert '"fraud_rate_high"' in capsys.readouterr().out
    rules.register_rule("broken_rule", metric=rules_support.broken, warning=1)
    call_command("watchdog")
    out = capsys.readouterr().out
    assert "rules: 2" in out and "fraud_rate_high   critical site: 90%" in out
    assert "broken_rule       error    ZeroDivisionError: no payments table yet" in out


def test_the_health_page_document_has_each_rule_with_its_value_levels_and_state(fraud_rate, admin_client):
    rules.register_metric("payments_broken", rules_support.broken)
    rules.register_rule("broken_rule", metric="payments_broken", warning=1)
    rules_support.VALUES["site"] = 55
    document = admin_client.get(reverse("admin:system_health") + "?format=json").json()
    by_name = {rule["name"]: rule for rule in document["rules"]}
    assert (by_name["fraud_rate_high"]["state"], by_name["fraud_rate_high"]["values"][0]["value"],
            by_name["fraud_rate_high"]["warning"], by_name["fraud_rate_high"]["critical"],
            by_name["fraud_rate_high"]["unit"]) == ("warning", 55, 50, 70, "%")
    assert by_name["broken_rule"]["state"] == "error"
    page = admin_client.get(reverse("admin:system_health")).content.decode()
    assert 'id="health-rules"' in page and "fraud_rate_high" in page  # the section, and the document it draws


def test_the_alert_admin_filters_by_a_rules_kind(fraud_rate, admin_client):
    rules_support.VALUES["site"] = 60
    watchdog.run(now=NOW)
    Alert.raise_or_update(Alert.QUOTA, WARNING, "80% of the hourly quota used", now=NOW)
    url = reverse("admin:monitoring_alert_changelist")
    page = admin_client.get(url).content.decode()
    assert "?kind__exact=rule%3Afraud_rate_high" in page
    filtered = admin_client.get(url, {"kind__exact": "rule:fraud_rate_high"})
    assert [alert.kind for alert in filtered.context["cl"].result_list] == ["rule:fraud_rate_high"]
