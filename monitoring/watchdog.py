"""The watchdog: rules over the fleet's call statistics that raise, escalate and resolve alerts.

One run (``run``), every minute from django-q and by ``manage.py watchdog``:

1. flush this process's buffered call statistics, so the run sees them;
2. read, in a few queries, every integration's counters over the window
   (the last hour) and the recent window (the last 5 minutes), its usage of
   the current quota windows, the breakers open too long and the dead
   letter backlog;
3. apply each rule; a rule returns at most one finding per integration; then the
   user-defined rules on business metrics (monitoring/rules.py), whose metric
   functions are called here (one that raises makes its rule erroring, nothing more);
4. raise or update an alert per finding, all in one transaction (repeats
   count occurrences, severity escalates), and resolve every watchdog alert
   whose condition is gone;
5. return the report: warnings, critical alerts, overall status, generated at.

Thresholds live in ``RESILIENCE_WATCHDOG`` (monitoring/conf.py). Rates need at least
``min_calls`` calls in their window, so one failure among three calls is
not an error spike. Errors are the failures the breaker counts (timeout,
network, server error, rate limit, unknown) over the calls the pipeline let
through; refusals have rules of their own (unavailable, quota, degraded).
Quota usage is read from the statistics (attempts are what quota counts),
so it is the fleet's whatever the state store.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from integrations.models import BreakerState, Integration

from .counters import COUNTER_COLUMNS, ERROR_COLUMNS, LATENCY_SUM_COLUMN, REJECTION_COLUMNS
from .histogram import share_above
from .models import CRITICAL, WARNING, Alert, CallStats, describe
from . import rules as user_rules
from .notifications import dlq_installed
from .stats import flush_quietly
from .stats import buffer as stats_buffer
from .conf import monitoring_settings

logger = logging.getLogger(__name__)

WATCHDOG_KINDS = (Alert.ERROR_SPIKE, Alert.SLOW_CALLS, Alert.UNAVAILABLE, Alert.QUOTA, Alert.DLQ_BACKLOG,
                  Alert.TRAFFIC_SPIKE, Alert.DEGRADED_SERVICE)
HEALTHY = "healthy"
RECENT_COLUMNS = ("calls", *REJECTION_COLUMNS.values(), *ERROR_COLUMNS)


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: str
    message: str
    integration: Integration | None = None
    details: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int | None]:
        return self.kind, self.integration.pk if self.integration is not None else None


@dataclass
class Observed:
    """What the watchdog knows about one integration for one run."""

    integration: Integration
    window: dict  # describe() of the window's counters
    recent: dict  # describe() of the recent window's calls, refusals and errors
    hour_attempts: int = 0
    day_attempts: int = 0
    open_since: datetime | None = None


def thresholds() -> dict:
    return dict(monitoring_settings.WATCHDOG)


def _percent(ratio: float | None) -> float | None:
    return None if ratio is None else round(100 * ratio, 1)


# -- the rules: each looks at one integration at ``now`` and returns a finding or None ----------

def past(value: float, warning: float, critical: float) -> str | None:
    """CRITICAL above the critical level, WARNING above the warning level, else None."""
    return CRITICAL if value > critical else WARNING if value > warning else None


def error_spike(seen: Observed, t: dict, now: datetime) -> Finding | None:
    window = seen.window
    if window["calls"] - window["rejected"] < t["min_calls"]:
        return None
    rate = 100 * window["error_rate"]
    severity = past(rate, t["error_warning_percent"], t["error_critical_percent"])
    if severity is None:
        return None
    by_category = {column.removeprefix("failures_"): window[column] for column in ERROR_COLUMNS if window[column]}
    return Finding(Alert.ERROR_SPIKE, severity,
                   f"{rate:.0f}% of calls failed over the last {t['window_minutes']} min",
                   seen.integration,
                   {"error_percent": round(rate, 1), "errors": window["errors"],
                    "calls": window["calls"] - window["rejected"], "by_category": by_category,
                    "window_minutes": t["window_minutes"]})


def slow_calls(seen: Observed, t: dict, now: datetime) -> Finding | None:
    window = seen.window
    if window["upstream_calls"] < t["min_calls"]:
        return None
    threshold_ms = seen.integration.slow_call_ms
    share = 100 * share_above(window["latency_buckets"], threshold_ms)
    if share <= t["slow_percent"]:
        return None
    return Finding(Alert.SLOW_CALLS, WARNING,
                   f"{share:.0f}% of calls slower than {threshold_ms} ms over the last {t['window_minutes']} min",
                   seen.integration,
                   {"slow_percent": round(share, 1), "slow_call_ms": threshold_ms,
                    "p50_ms": window["latency_p50_ms"], "p95_ms": window["latency_p95_ms"],
                    "p99_ms": window["latency_p99_ms"], "calls": window["upstream_calls"],
                    "window_minutes": t["window_minutes"]})


def unavailable(seen: Observed, t: dict, now: datetime) -> Finding | None:
    reasons, details = [], {"window_minutes": t["recent_minutes"]}
    if seen.open_since is not None:
        minutes = (now - seen.open_since).total_seconds() / 60
        reasons.append(f"breaker open for {minutes:.0f} min")
        details["open_since"] = seen.open_since.isoformat()
    recent = seen.recent
    let_through = recent["calls"] - recent["rejected"]
    if let_through >= t["min_calls"]:
        failure_rate = 100 * recent["errors"] / let_through
        timeout_rate = 100 * recent["failures_timeout"] / let_through
        details.update(failure_percent=round(failure_rate, 1), timeout_percent=round(timeout_rate, 1),
                       calls=let_through)
        if failure_rate > t["unavailable_failure_percent"]:
            reasons.append(f"{failure_rate:.0f}% failures over the last {t['recent_minutes']} min")
        if timeout_rate > t["unavailable_timeout_percent"]:
            reasons.append(f"{timeout_rate:.0f}% timeouts over the last {t['recent_minutes']} min")
    if not reasons:
        return None
    details["reasons"] = reasons
    return Finding(Alert.UNAVAILABLE, CRITICAL, "unavailable: " + "; ".join(reasons), seen.integration, details)


def quota(seen: Observed, t: dict, now: datetime) -> Finding | None:
    integration = seen.integration
    usage = {window: (used, limit) for window, used, limit in (
        ("hourly", seen.hour_attempts, integration.hourly_limit),
        ("daily", seen.day_attempts, integration.daily_limit)) if limit}
    if not usage:
        return None
    window, (used, limit) = max(usage.items(), key=lambda item: item[1][0] / item[1][1])
    percent = 100 * used / limit
    severity = (CRITICAL if percent >= t["quota_critical_percent"]
                else WARNING if percent >= t["quota_warning_percent"] else None)
    if severity is None:
        return None
    return Finding(Alert.QUOTA, severity, f"{percent:.0f}% of the {window} quota used ({used}/{limit})",
                   integration,
                   {"window": window, "used": used, "limit": limit, "percent": round(percent, 1),
                    **{f"{name}_used": value[0] for name, value in usage.items()}})


def traffic_spike(seen: Observed, t: dict, now: datetime) -> Finding | None:
    """The recent rate against the window's average; the window before the recent minutes must have
    ``min_calls`` calls, so the first minutes of a new integration are not a spike."""
    window_calls, recent_calls = seen.window["calls"], seen.recent["calls"]
    if window_calls - recent_calls < t["min_calls"]:
        return None
    average = window_calls / t["window_minutes"]
    recent = recent_calls / t["recent_minutes"]
    if recent <= t["traffic_factor"] * average:
        return None
    return Finding(Alert.TRAFFIC_SPIKE, WARNING,
                   f"{recent:.1f} calls/min over the last {t['recent_minutes']} min, "
                   f"{recent / average:.1f}x the {t['window_minutes']} min average of {average:.1f}",
                   seen.integration,
                   {"recent_per_minute": round(recent, 2), "average_per_minute": round(average, 2),
                    "factor": round(recent / average, 2)})


def degraded_service(seen: Observed, t: dict, now: datetime) -> Finding | None:
    window = seen.window
    if window["calls"] < t["min_calls"]:
        return None
    share = 100 * window["fallback_rate"]
    severity = past(share, t["fallback_warning_percent"], t["fallback_critical_percent"])
    if severity is None:
        return None
    return Finding(Alert.DEGRADED_SERVICE, severity,
                   f"{share:.0f}% of calls served by fallbacks over the last {t['window_minutes']} min",
                   seen.integration,
                   {"fallback_percent": round(share, 1), "fallbacks": window["fallbacks"], "calls": window["calls"],
                    "window_minutes": t["window_minutes"]})


def dlq_backlog(t: dict, now: datetime) -> Finding | None:
    """Dead letters still waiting (pending or retrying) after ``dlq_minutes``; nothing without the DLQ app."""
    if not dlq_installed():
        return None
    from integrations.dlq.models import DeadLetter

    stuck = dict(DeadLetter.objects.waiting().filter(created_at__lte=now - timedelta(minutes=t["dlq_minutes"]))
                 .order_by().values("integration_name").annotate(n=Count("id")).values_list("integration_name", "n"))
    waiting = sum(stuck.values())
    if waiting <= t["dlq_pending"]:
        return None
    return Finding(Alert.DLQ_BACKLOG, WARNING,
                   f"{waiting} dead letters waiting for more than {t['dlq_minutes']} min",
                   details={"waiting": waiting, "by_integration": stuck, "threshold": t["dlq_pending"],
                            "minutes": t["dlq_minutes"]})


INTEGRATION_RULES = (error_spike, slow_calls, unavailable, quota, traffic_spike, degraded_service)


# -- one run -----------------------------------------------------------------------------------

def observe(now: datetime, t: dict) -> list[Observed]:
    """Every integration with its counters for this run, in four queries (three once an hour's sum is kept)."""
    window_start = now - timedelta(minutes=t["window_minutes"])
    recent_start = now - timedelta(minutes=t["recent_minutes"])
    hour_start = now.replace(minute=0, second=0, microsecond=0)
    day_start = hour_start.replace(hour=0)
    integrations = list(Integration.objects.only("id", "name", "slow_call_ms", "hourly_limit", "daily_limit"))
    # The rows start at the window or the hour, whichever is earlier; the window's sums need no filter
    # when it is the earlier (the default 60 minutes always is), which halves the cost of reading them.
    window_filter = None if window_start <= hour_start else Q(minute__gte=window_start)
    rows = (CallStats.objects.filter(minute__gte=min(window_start, hour_start), minute__lte=now)
            .order_by().values("integration_id")
            .annotate(**{f"window_{column}": Sum(column, filter=window_filter)
                         for column in (*COUNTER_COLUMNS, LATENCY_SUM_COLUMN)},
                      **{f"recent_{column}": Sum(column, filter=Q(minute__gte=recent_start))
                         for column in RECENT_COLUMNS},
                      hour_attempts=Sum("attempts", filter=Q(minute__gte=hour_start))))
    by_id = {row["integration_id"]: row for row in rows}
    before_this_hour = (_attempts_before_this_hour(day_start, hour_start, now)
                        if any(i.daily_limit for i in integrations) else {})
    open_since = dict(BreakerState.objects.filter(
        state="open", opened_at__lte=now - timedelta(minutes=t["open_minutes"])).values_list("integration_id",
                                                                                           "opened_at"))
    observed = []
    for integration in integrations:
        row = by_id.get(integration.pk, {})
        observed.append(Observed(
            integration=integration,
            window=describe(row, prefix="window_"),
            recent=describe(row, prefix="recent_"),
            hour_attempts=row.get("hour_attempts") or 0,
            day_attempts=(before_this_hour.get(integration.pk) or 0) + (row.get("hour_attempts") or 0),
            open_since=open_since.get(integration.pk),
        ))
    return observed


# Today's attempts before the current hour, per integration: summed once an hour per process instead
# of every run (a day of per-minute rows is most of a run's reading). Summed only once the hour is
# late_stats() old, so no process is still flushing minutes of it.
def late_stats() -> timedelta:
    return timedelta(seconds=max(60, 3 * monitoring_settings.STATS_FLUSH_S))


_completed_hours: dict = {"key": None, "sums": {}}


def _attempts_before_this_hour(day_start: datetime, hour_start: datetime, now: datetime) -> dict[int, int]:
    """Every integration's sum, not only those with a daily quota: filtered by integration, the
    databases walk the (integration, minute) index and fetch the rows out of the order they were
    written in (minute by minute), 3.5x slower on SQLite than reading the day's minutes in order."""
    key = (day_start, hour_start)
    if _completed_hours["key"] == key:
        return _completed_hours["sums"]
    sums = dict(
        CallStats.objects.filter(minute__gte=day_start, minute__lt=hour_start)
        .order_by().values("integration_id").annotate(used=Sum("attempts")).values_list("integration_id", "used"))
    if now - hour_start >= late_stats():
        _completed_hours.update(key=key, sums=sums)
    return sums


def evaluate(now: datetime | None = None, t: dict | None = None) -> list[Finding]:
    """Every finding of every rule (the built-in ones and the user's), without touching alerts."""
    return _evaluate(now or timezone.now(), t or thresholds())[0]


def _evaluate(now: datetime, t: dict) -> tuple[list[Finding], list[dict]]:
    """The findings, and the user-defined rules' results (monitoring/rules.py) for the report."""
    findings = []
    for seen in observe(now, t):
        for rule in INTEGRATION_RULES:
            finding = rule(seen, t, now)
            if finding is not None:
                findings.append(finding)
    backlog = dlq_backlog(t, now)
    if backlog is not None:
        findings.append(backlog)
    rule_findings, rule_results = evaluate_rules(now)
    return findings + rule_findings, rule_results


# -- the user-defined rules (monitoring/rules.py) ----------------------------------------------

def all_rules() -> list[user_rules.Rule]:
    """The registered rules, then those of RESILIENCE_WATCHDOG_RULES (a name may not be in both)."""
    declared = monitoring_settings.WATCHDOG_RULES
    registered = {rule.name: rule for rule in user_rules.registered_rules()}
    twice = sorted(rule.name for rule in declared if rule.name in registered)
    if twice:
        raise ImproperlyConfigured(f"RESILIENCE_WATCHDOG_RULES declares {twice[0]!r}, which is also registered "
                                   f"with register_rule().")
    return [*registered.values(), *declared]


def _number(value, samples, rule: user_rules.Rule, who: str) -> tuple[float | None, int | None]:
    if isinstance(value, user_rules.Measure):
        value, samples = value
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"the metric gave {who} a sample count that is not a whole number: {samples!r}")
    if value is None:
        return None, samples
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"the metric gave {who} a value that is not a finite number: {value!r}")
    if rule.min_samples and samples is None:
        raise ValueError(f"the rule needs min_samples={rule.min_samples}: the metric must give Measure(value, "
                         f"samples), not a plain number ({who})")
    return value, samples


def evaluate_rules(now: datetime, rules: list[user_rules.Rule] | None = None) -> tuple[list[Finding], list[dict]]:
    """Every user-defined rule's findings and its result for the report; a failing metric makes its rule erroring."""
    rules = all_rules() if rules is None else rules
    findings, results = [], []
    for rule in rules:
        result = {**rule.as_dict(), "kind": rule.kind, "state": user_rules.NO_DATA, "error": None, "values": []}
        results.append(result)
        try:
            with transaction.atomic():  # a database error in the metric rolls back to here, not the run
                raw = rule.metric.fn(now)
            by_name = raw if isinstance(raw, dict) else {None: raw}
            names = [name for name in by_name if name is not None]
            for name in names:
                if not isinstance(name, str):
                    raise ValueError(f"the metric's keys must be integration names or None; got {name!r}")
            integrations = {i.name: i for i in Integration.objects.filter(name__in=names)} if names else {}
            unknown = sorted(set(names) - set(integrations))
            if unknown:
                raise ValueError(f"the metric gave a value for {unknown[0]!r}, which is no integration")
            values, rule_findings, counted = [], [], False
            for name, raw_value in by_name.items():
                who = f"integration {name!r}" if name is not None else "the site"
                value, samples = _number(raw_value, None, rule, who)
                entry = {"integration": name, "value": value, "samples": samples, "severity": None}
                values.append(entry)
                if value is None or (rule.min_samples and samples < rule.min_samples):
                    continue  # no data, or too few samples: no finding, so its alert clears
                counted = True
                severity = entry["severity"] = rule.severity(value)
                if severity is not None:
                    rule_findings.append(Finding(rule.kind, severity, _message(rule, value, severity),
                                                 integrations.get(name) if name is not None else None,
                                                 {"rule": rule.name, "metric": rule.metric.name, "value": value,
                                                  "samples": samples, "warning": rule.warning,
                                                  "critical": rule.critical, "direction": rule.direction,
                                                  "unit": rule.metric.unit}))
        except Exception as exc:  # a user's metric: reported as erroring, the watchdog goes on
            logger.exception("watchdog rule %r: its metric %r failed", rule.name, rule.metric.name)
            result.update(state=user_rules.ERROR, error=f"{type(exc).__name__}: {exc}"[:500])
            # the rule watches nothing while its metric fails: that is an alert of its own, resolved
            # by the first run in which the metric works again (the rule's own alerts stay as they are)
            findings.append(Finding(rule.error_kind, WARNING,
                                    f"{rule.name}: its metric {rule.metric.name!r} failed, so the rule watches "
                                    f"nothing: {result['error']}"[:500], None,
                                    {"rule": rule.name, "metric": rule.metric.name, "error": result["error"]}))
            continue
        findings.extend(rule_findings)
        result["values"] = values
        severities = {entry["severity"] for entry in values}
        result["state"] = (user_rules.CRITICAL_STATE if CRITICAL in severities
                           else user_rules.WARNING_STATE if WARNING in severities
                           else user_rules.HEALTHY if counted else user_rules.NO_DATA)
    return findings, results


def _message(rule: user_rules.Rule, value: float, severity: str) -> str:
    level = rule.critical if severity == CRITICAL else rule.warning
    unit = rule.metric.unit
    return f"{rule.name}: {value:g}{unit} {rule.direction} the {severity} level of {level:g}{unit}"


def run(now: datetime | None = None, t: dict | None = None) -> dict:
    """One watchdog run (the steps are in the module docstring); returns the report."""
    now = now or timezone.now()
    flush_quietly(stats_buffer)
    findings, rule_results = _evaluate(now, t or thresholds())
    changes = {Alert.NEW: [], Alert.ESCALATED: [], Alert.REPEATED: [], Alert.RESOLVED_EVENT: []}
    for alert, change in Alert.raise_or_update_many(findings, now=now):
        changes[change].append(alert.pk)
    current = {finding.key for finding in findings}
    # An erroring rule says nothing about its condition: its alerts stay as they are.
    erroring = {result["kind"] for result in rule_results if result["state"] == user_rules.ERROR}
    watched = Q(kind__in=WATCHDOG_KINDS) | Q(kind__startswith=user_rules.KIND_PREFIX)
    for alert in Alert.objects.active().filter(watched).exclude(kind__in=erroring):
        if (alert.kind, alert.integration_id) not in current and alert.resolve("condition cleared", now=now):
            changes[Alert.RESOLVED_EVENT].append(alert.pk)
    return {**report(now, rules=rule_results), "changes": changes}


def report(now: datetime | None = None, rules: list[dict] | None = None) -> dict:
    """The state of every active alert: warnings, critical alerts, overall status and when; and the
    user-defined rules with their current values (``rules``: a run's results, else evaluated now)."""
    now = now or timezone.now()
    if rules is None:
        rules = evaluate_rules(now)[1]
    alerts = list(Alert.objects.active().select_related("integration", "acknowledged_by")
                  .order_by("kind", "integration__name"))
    critical = [alert.as_dict() for alert in alerts if alert.severity == CRITICAL]
    warnings = [alert.as_dict() for alert in alerts if alert.severity == WARNING]
    status = CRITICAL if critical else WARNING if warnings else HEALTHY
    return {"status": status, "generated_at": now.isoformat(),
            "critical": critical, "warnings": warnings, "rules": rules}
