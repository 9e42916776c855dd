"""Monitoring: call statistics, alerts, health checks and notification channels.

Behaviour lives on the models (``Alert.raise_or_update``, ``alert.acknowledge``,
``alert.resolve``, ``check.run``, ``channel.notify``) so the watchdog, the
admin, the API and the commands all call the same methods.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from functools import partial
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator, validate_email
from django.db import IntegrityError, models, transaction
from django.db.models import Count, F, Q, Sum, Value
from django.db.models.functions import Coalesce
from django.dispatch import Signal
from django.utils import timezone

from integrations.levels import ratio
from integrations.models import Integration

from .counters import COUNTER_COLUMNS, ERROR_COLUMNS, FALLBACK_COLUMNS, LATENCY_SUM_COLUMN, REJECTION_COLUMNS
from .healthchecks import probe, registered_checks
from .histogram import BUCKET_NAMES, percentiles

logger = logging.getLogger("monitoring.models")

# An alert was raised, escalated or resolved (after commit): alert_id, event. notifications.py delivers it.
alert_event = Signal()

WARNING = "warning"
CRITICAL = "critical"
SEVERITY_CHOICES = [(WARNING, "Warning"), (CRITICAL, "Critical")]
SEVERITY_RANK = {WARNING: 1, CRITICAL: 2}


def _now(now: datetime | None) -> datetime:
    return now or timezone.now()


def _check_severity(severity: str) -> None:
    if severity not in SEVERITY_RANK:
        raise ValueError(f"unknown alert severity {severity!r}; expected one of {', '.join(SEVERITY_RANK)}")


# -- call statistics ---------------------------------------------------------------------------

class CallStatsQuerySet(models.QuerySet):
    def get_by_natural_key(self, integration: str, minute) -> CallStats:
        return self.get(integration__name=integration, minute=minute)

    def between(self, since: datetime, until: datetime) -> CallStatsQuerySet:
        return self.filter(minute__gte=since, minute__lt=until)

    def totals(self) -> dict:
        """Every counter summed over the rows, with the error rate and p50/p95/p99 latency."""
        sums = self.aggregate(**{column: Coalesce(Sum(column), Value(0)) for column in COUNTER_COLUMNS},
                              **{LATENCY_SUM_COLUMN: Coalesce(Sum(LATENCY_SUM_COLUMN), Value(0.0))})
        return describe(sums)

    def totals_by_integration(self) -> dict[int, dict]:
        """``totals()`` per integration id."""
        # an annotation may not take the name of the column it sums: "sum_" prefixes, removed by describe()
        rows = self.order_by().values("integration_id").annotate(
            **{f"sum_{column}": Sum(column) for column in (*COUNTER_COLUMNS, LATENCY_SUM_COLUMN)})
        return {row["integration_id"]: describe(row, prefix="sum_") for row in rows}


def describe(sums: dict, prefix: str = "") -> dict:
    """Summed counters (keyed ``prefix + column``; missing or None: 0) plus what operators read from them:
    errors, rates, latency percentiles."""
    counts = {column: sums.get(prefix + column) or 0 for column in (*COUNTER_COLUMNS, LATENCY_SUM_COLUMN)}
    calls = counts["calls"]
    rejected = sum(counts[column] for column in REJECTION_COLUMNS.values())
    errors = sum(counts[column] for column in ERROR_COLUMNS)
    fallbacks = sum(counts[column] for column in FALLBACK_COLUMNS.values())
    buckets = [counts[name] for name in BUCKET_NAMES]
    upstream_calls = sum(buckets)
    return {
        **counts,
        "errors": errors,
        "rejected": rejected,
        "fallbacks": fallbacks,
        "upstream_calls": upstream_calls,
        # errors are measured over the calls the pipeline let through: refusals have rules of their own
        "error_rate": errors / (calls - rejected) if calls - rejected else None,
        "success_rate": ratio(counts["successes"], calls),
        "cache_hit_ratio": ratio(counts["cache_hits"], counts["cache_hits"] + counts["cache_misses"]),
        "fallback_rate": fallbacks / calls if calls else None,
        "latency_buckets": buckets,
        "latency_avg_ms": counts[LATENCY_SUM_COLUMN] / upstream_calls if upstream_calls else None,
        **{f"latency_{name}_ms": value for name, value in percentiles(buckets).items()},
    }


class _Counters(models.Model):
    class Meta:
        abstract = True


for _column in COUNTER_COLUMNS:
    _Counters.add_to_class(_column, models.PositiveIntegerField(default=0))


class CallStats(_Counters):
    """One integration's calls during one UTC minute, summed over every process and host.

    The counter columns are listed once, in ``monitoring.counters``; the
    latency columns are per-bucket counts of ``monitoring.histogram``.
    """

    integration = models.ForeignKey(Integration, on_delete=models.CASCADE, related_name="call_stats")
    minute = models.DateTimeField(help_text="Start of the UTC minute.")
    latency_sum_ms = models.FloatField(default=0.0)

    objects = CallStatsQuerySet.as_manager()

    class Meta:
        verbose_name = "call statistics"
        verbose_name_plural = "call statistics"
        ordering = ["-minute", "integration_id"]
        constraints = [models.UniqueConstraint(fields=["integration", "minute"],
                                               name="monitoring_callstats_one_row_per_minute")]
        indexes = [models.Index(fields=["minute"], name="monitoring_callstats_minute")]

    def __str__(self) -> str:
        return f"{self.integration_id} @ {self.minute:%Y-%m-%d %H:%M}: {self.calls} calls"

    def natural_key(self) -> tuple:
        return (self.integration.name, self.minute)

    natural_key.dependencies = ["integrations.integration"]

    def summary(self) -> dict:
        return describe({column: getattr(self, column) for column in (*COUNTER_COLUMNS, LATENCY_SUM_COLUMN)})


# -- alerts -----------------------------------------------------------------------------------

class AlertQuerySet(models.QuerySet):
    def active(self) -> AlertQuerySet:
        """Open or acknowledged: the condition has not cleared yet."""
        return self.filter(status__in=Alert.ACTIVE)

    def open_counts_by_severity(self) -> dict[str, int]:
        """Active alerts per severity, every severity present (0 when none): for gauges and reports."""
        counts = dict(self.active().order_by().values_list("severity").annotate(n=Count("id")))
        return {severity: counts.get(severity, 0) for severity, _ in SEVERITY_CHOICES}


class Alert(models.Model):
    """Something operators must know about; one active alert per kind and integration.

    A repeat of the condition counts an occurrence on the active alert; a
    worse severity escalates it (and re-opens it if it was acknowledged); it
    never de-escalates while active, and resolves when the condition clears.
    New, escalated and resolved alerts are sent to the notification channels.
    """

    ERROR_SPIKE = "error_spike"
    SLOW_CALLS = "slow_calls"
    UNAVAILABLE = "unavailable"
    QUOTA = "quota"
    DLQ_BACKLOG = "dlq_backlog"
    TRAFFIC_SPIKE = "traffic_spike"
    DEGRADED_SERVICE = "degraded_service"
    HEALTH_CHECK = "health_check"
    KIND_CHOICES = [
        (ERROR_SPIKE, "Error spike"),
        (SLOW_CALLS, "Slow calls"),
        (UNAVAILABLE, "Unavailable"),
        (QUOTA, "Quota"),
        (DLQ_BACKLOG, "Dead letter backlog"),
        (TRAFFIC_SPIKE, "Traffic spike"),
        (DEGRADED_SERVICE, "Degraded service"),
        (HEALTH_CHECK, "Health check"),
    ]

    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    STATUS_CHOICES = [(OPEN, "Open"), (ACKNOWLEDGED, "Acknowledged"), (RESOLVED, "Resolved")]
    ACTIVE = (OPEN, ACKNOWLEDGED)

    # What happened to an alert, as notified.
    NEW = "new"
    ESCALATED = "escalated"
    REPEATED = "repeated"
    RESOLVED_EVENT = "resolved"

    # A user-defined rule's alerts are of kind "rule:<its name>" (monitoring/rules.py), not among the choices.
    kind = models.CharField(max_length=80, choices=KIND_CHOICES)
    severity = models.CharField(max_length=10, choices=SEVERITY_CHOICES)
    integration = models.ForeignKey(Integration, null=True, blank=True, on_delete=models.CASCADE,
                                    related_name="alerts", help_text="Blank for alerts about the whole site.")
    message = models.CharField(max_length=500)
    details = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=15, choices=STATUS_CHOICES, default=OPEN)
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField()
    occurrences = models.PositiveIntegerField(default=1)
    acknowledged_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                        related_name="+")
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolution = models.CharField(max_length=200, blank=True, help_text="Why it was resolved, and by whom.")

    objects = AlertQuerySet.as_manager()

    class Meta:
        ordering = ["-last_seen", "-id"]
        constraints = [
            # NULL integrations (site-wide alerts) must collide too: hence the Coalesce.
            models.UniqueConstraint("kind", Coalesce("integration", Value(0)),
                                    condition=Q(status__in=("open", "acknowledged")),
                                    name="monitoring_one_active_alert_per_kind_and_integration"),
        ]
        indexes = [models.Index(fields=["status", "severity"], name="monitoring_alert_status")]

    def __str__(self) -> str:
        where = f" {self.integration.name}" if self.integration_id else ""
        return f"[{self.severity}] {self.get_kind_display()}{where}: {self.message}"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @classmethod
    def raise_or_update(cls, kind: str, severity: str, message: str, *, integration: Integration | None = None,
                        details: dict | None = None, now: datetime | None = None) -> tuple[Alert, str]:
        """Raise a new alert, or count one more occurrence of the active one; returns (alert, what happened).

        What happened is NEW, ESCALATED or REPEATED. Two processes raising the
        same alert at once end with one alert: the constraint refuses the
        second insert, which then updates the first.
        """
        _check_severity(severity)
        now = _now(now)
        details = details or {}
        with transaction.atomic():
            alert = cls._active_for_update(kind, integration)
            if alert is None:
                try:
                    with transaction.atomic():
                        alert = cls.objects.create(kind=kind, severity=severity, integration=integration,
                                                   message=message[:500], details=details, first_seen=now,
                                                   last_seen=now)
                except IntegrityError:
                    # another process raised it between our read and our insert: update theirs
                    alert = cls._active_for_update(kind, integration)
                    if alert is None:
                        raise
                else:
                    alert._notify_after_commit(cls.NEW)
                    return alert, cls.NEW
            change = alert._repeat(severity, message, details, now)
            alert.save(update_fields=cls.REPEAT_FIELDS if change == cls.ESCALATED else cls.REPEAT_FIELDS[:4])
            if change == cls.ESCALATED:
                alert._notify_after_commit(cls.ESCALATED)
        return alert, change

    # What a repeat writes: the first four always, severity and status when it escalates.
    REPEAT_FIELDS = ("occurrences", "last_seen", "message", "details", "severity", "status")

    def _repeat(self, severity: str, message: str, details: dict, now: datetime) -> str:
        """One more occurrence of this active alert, in memory: ESCALATED (re-opened) when worse, else REPEATED."""
        self.occurrences += 1
        self.last_seen = now
        self.message = message[:500]
        self.details = details
        if SEVERITY_RANK[severity] <= SEVERITY_RANK[self.severity]:
            return self.REPEATED
        self.severity = severity
        self.status = self.OPEN  # an acknowledgement was of the milder condition
        return self.ESCALATED

    @classmethod
    def raise_or_update_many(cls, findings, now: datetime | None = None) -> list[tuple[Alert, str]]:
        """``raise_or_update`` of each finding in turn, in one transaction and three statements.

        Each finding has ``kind``, ``severity``, ``message``, ``integration`` and
        ``details`` (a ``watchdog.Finding``); the answer is (alert, what happened)
        per finding, in order. The active alerts of their kinds are read (and
        locked) at once, the new ones inserted at once and the others updated
        at once (in batches where the database limits a statement's size).
        When another process raised one of the new alerts meanwhile, the
        insert is refused and every finding goes through ``raise_or_update``.
        """
        findings = list(findings)
        for finding in findings:
            _check_severity(finding.severity)
        now = _now(now)
        with transaction.atomic():
            active = {(alert.kind, alert.integration_id): alert for alert in cls.objects.select_for_update()
                      .active().filter(kind__in={finding.kind for finding in findings})}
            outcomes, new, repeated = [], [], {}
            for finding in findings:
                key = (finding.kind, finding.integration.pk if finding.integration is not None else None)
                alert = active.get(key)
                if alert is None:
                    alert = active[key] = cls(kind=finding.kind, severity=finding.severity,
                                              integration=finding.integration, message=finding.message[:500],
                                              details=finding.details or {}, first_seen=now, last_seen=now)
                    new.append(alert)
                    outcomes.append((alert, cls.NEW))
                    continue
                outcomes.append((alert, alert._repeat(finding.severity, finding.message, finding.details or {}, now)))
                if alert.pk is not None:  # else a repeat, in this batch, of one of the new ones
                    repeated[alert.pk] = alert
            try:
                with transaction.atomic():
                    cls.objects.bulk_create(new)
            except IntegrityError:
                return [cls.raise_or_update(finding.kind, finding.severity, finding.message,
                                            integration=finding.integration, details=finding.details, now=now)
                        for finding in findings]
            cls.objects.bulk_update(repeated.values(), cls.REPEAT_FIELDS)
            for alert, change in outcomes:
                if change in (cls.NEW, cls.ESCALATED):
                    alert._notify_after_commit(change)
        return outcomes

    @classmethod
    def _active_for_update(cls, kind: str, integration: Integration | None) -> Alert | None:
        return cls.objects.select_for_update().active().filter(kind=kind, integration=integration).first()

    def acknowledge(self, user, now: datetime | None = None) -> bool:
        """An operator has seen it; False when it was not open (already acknowledged, or resolved)."""
        now = _now(now)
        claimed = Alert.objects.filter(pk=self.pk, status=self.OPEN).update(
            status=self.ACKNOWLEDGED, acknowledged_by=user, acknowledged_at=now)
        if claimed:
            self.status, self.acknowledged_by, self.acknowledged_at = self.ACKNOWLEDGED, user, now
        return bool(claimed)

    def resolve(self, reason: str = "condition cleared", by=None, now: datetime | None = None) -> bool:
        """Close it (the condition cleared, or an operator says so); False when it was already resolved.

        Only the caller that actually resolves it notifies, so two watchdogs
        clearing the same alert send one notification.
        """
        now = _now(now)
        if by is not None:
            reason = f"{reason} (by {by.get_username() if hasattr(by, 'get_username') else by})"
        claimed = Alert.objects.filter(pk=self.pk, status__in=self.ACTIVE).update(
            status=self.RESOLVED, resolved_at=now, resolution=reason[:200])
        if claimed:
            self.status, self.resolved_at, self.resolution = self.RESOLVED, now, reason[:200]
            self._notify_after_commit(self.RESOLVED_EVENT)
        return bool(claimed)

    def as_dict(self) -> dict:
        """JSON-ready form, for reports, notifications and the API."""
        return {
            "id": self.pk,
            "kind": self.kind,
            "severity": self.severity,
            "integration": self.integration.name if self.integration_id else None,
            "message": self.message,
            "details": self.details,
            "status": self.status,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
            "occurrences": self.occurrences,
            "acknowledged_by": self.acknowledged_by.get_username() if self.acknowledged_by_id else None,
            "acknowledged_at": self.acknowledged_at.isoformat() if self.acknowledged_at else None,
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
            "resolution": self.resolution,
        }

    def _notify_after_commit(self, event: str) -> None:
        # notifications.py delivers it (a receiver connected by the app): a model sends no message itself
        transaction.on_commit(partial(alert_event.send, sender=Alert, alert_id=self.pk, event=event))


# -- health checks ----------------------------------------------------------------------------


class SystemHealth(Alert):
    """The admin's System health page (monitoring/admin.py, monitoring/health_page.py).

    A proxy with no rows or permissions of its own: it gives the page its place in the admin's
    index and sidebar (Monitoring > System health) in any project, with no URL to add.
    """

    class Meta:
        proxy = True
        verbose_name = verbose_name_plural = "System health"
        default_permissions = ()


class HealthCheckQuerySet(models.QuerySet):
    def get_by_natural_key(self, integration: str) -> HealthCheck:
        return self.get(integration__name=integration)

    def due(self, now: datetime | None = None) -> list[HealthCheck]:
        """Enabled checks whose interval has passed since they last ran (or that never ran)."""
        now = _now(now)
        return [check for check in self.filter(enabled=True).select_related("integration")
                if check.last_checked_at is None
                or check.last_checked_at + timedelta(seconds=check.interval_s) <= now]


class HealthCheck(models.Model):
    """How to tell whether an integration's upstream is up: an HTTP probe or a registered Python check.

    The probe goes straight to the upstream, not through the pipeline: an open
    breaker must not stop the check that tells when the upstream is back.
    """

    HTTP = "http"
    PYTHON = "python"
    KIND_CHOICES = [(HTTP, "HTTP probe"), (PYTHON, "Registered Python check")]
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    STATUS_CHOICES = [(UNKNOWN, "Unknown"), (UP, "Up"), (DOWN, "Down")]

    integration = models.OneToOneField(Integration, on_delete=models.CASCADE, related_name="health_check")
    kind = models.CharField(max_length=10, choices=KIND_CHOICES, default=HTTP)
    url = models.URLField(max_length=500, blank=True, help_text="HTTP probe: the URL to GET.")
    expected_status = models.PositiveSmallIntegerField(default=200, help_text="HTTP probe: the healthy status.")
    check_name = models.CharField(max_length=100, blank=True,
                                  help_text="Python check: the name it was registered with @health_check(...).")
    timeout_ms = models.PositiveIntegerField(default=5_000, validators=[MinValueValidator(1)])
    interval_s = models.PositiveIntegerField(default=60, validators=[MinValueValidator(60)],
                                             help_text="Seconds between runs; the scheduler ticks every minute.")
    failures_before_down = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1)], help_text="Consecutive failures before the upstream is down.")
    enabled = models.BooleanField(default=True)

    status = models.CharField(max_length=10, choices=STATUS_CHOICES, default=UNKNOWN, editable=False)
    changed_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_checked_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_latency_ms = models.FloatField(null=True, blank=True, editable=False)
    last_error = models.CharField(max_length=500, blank=True, editable=False)
    consecutive_successes = models.PositiveIntegerField(default=0, editable=False)
    consecutive_failures = models.PositiveIntegerField(default=0, editable=False)

    objects = HealthCheckQuerySet.as_manager()

    class Meta:
        ordering = ["integration__name"]

    def __str__(self) -> str:
        return f"{self.integration.name}: {self.status}"

    def natural_key(self) -> tuple[str]:
        return (self.integration.name,)

    natural_key.dependencies = ["integrations.integration"]

    def clean(self):
        if self.kind == self.HTTP and not self.url:
            raise ValidationError({"url": "An HTTP probe needs a URL."})
        if self.kind == self.PYTHON and self.check_name not in registered_checks():
            known = ", ".join(registered_checks()) or "none are registered"
            raise ValidationError({"check_name": f"No Python check is registered as {self.check_name!r} ({known})."})

    def claim(self, now: datetime | None = None) -> bool:
        """Take this run for this worker: False when another worker already took it."""
        now = _now(now)
        claimed = HealthCheck.objects.filter(pk=self.pk, last_checked_at=self.last_checked_at).update(
            last_checked_at=now)
        if claimed:
            self.last_checked_at = now
        return bool(claimed)

    def run(self, now: datetime | None = None) -> HealthCheckResult:
        """Probe now, keep the result, update the counts and the health; raise or resolve its alert."""
        outcome = probe(self)
        now = _now(now)
        with transaction.atomic():
            result = HealthCheckResult.objects.create(health_check=self, at=now, ok=outcome.ok,
                                                      latency_ms=outcome.latency_ms, status_code=outcome.status_code,
                                                      error=outcome.error[:500])
            if outcome.ok:
                self.consecutive_successes += 1
                self.consecutive_failures = 0
                health = self.UP
            else:
                self.consecutive_failures += 1
                self.consecutive_successes = 0
                health = self.DOWN if self.consecutive_failures >= self.failures_before_down else self.status
            changed = health != self.status
            self.status = health
            self.last_checked_at = now
            self.last_latency_ms = outcome.latency_ms
            self.last_error = outcome.error[:500]
            if changed:
                self.changed_at = now
            self.save(update_fields=["status", "changed_at", "last_checked_at", "last_latency_ms", "last_error",
                                     "consecutive_successes", "consecutive_failures"])
            if changed and health == self.DOWN:
                Alert.raise_or_update(
                    Alert.HEALTH_CHECK, CRITICAL, f"{self.integration.name} is down: {outcome.error}",
                    integration=self.integration, now=now,
                    details={"consecutive_failures": self.consecutive_failures, "status_code": outcome.status_code,
                             "latency_ms": outcome.latency_ms, "target": self.target})
            elif changed and health == self.UP:
                for alert in Alert.objects.active().filter(kind=Alert.HEALTH_CHECK, integration=self.integration):
                    alert.resolve("health check passed", now=now)
        return result

    @property
    def target(self) -> str:
        return self.url if self.kind == self.HTTP else f"python:{self.check_name}"


class HealthCheckResult(models.Model):
    health_check = models.ForeignKey(HealthCheck, on_delete=models.CASCADE, related_name="results")
    at = models.DateTimeField(db_index=True)
    ok = models.BooleanField()
    latency_ms = models.FloatField()
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["health_check", "-at"], name="monitoring_hcresult_check_at")]

    def __str__(self) -> str:
        return f"{self.health_check_id} @ {self.at:%Y-%m-%d %H:%M:%S}: {'ok' if self.ok else self.error}"


# -- notifications ----------------------------------------------------------------------------

def generate_secret() -> str:
    return secrets.token_hex(32)


def _validate_emails(value: str) -> None:
    for address in split_emails(value):
        validate_email(address)


def split_emails(value: str) -> list[str]:
    return [address.strip() for address in value.split(",") if address.strip()]


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _https_or_loopback(url: str) -> bool:
    """Whether a URL carrying a secret goes over https (or stays on this host: a local relay, a test)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme == "https" or parts.hostname in LOOPBACK_HOSTS


class NotificationChannelManager(models.Manager):
    def get_by_natural_key(self, name: str) -> NotificationChannel:
        return self.get(name=name)


class NotificationChannel(models.Model):
    """Where alerts are sent: an email list, a signed webhook or a Slack incoming webhook.

    Each channel is an integration of its own (``notify.<name>``), so its
    deliveries run through the pipeline (retries, breaker, timeouts) and a
    failed one goes to the dead letter queue, to be sent again by the redrive.
    At most ``rate_limit`` notifications go out per ``rate_window_s``; the
    ones past it are suppressed, counted, and said in the next one sent.
    """

    EMAIL = "email"
    WEBHOOK = "webhook"
    SLACK = "slack"
    KIND_CHOICES = [(EMAIL, "Email"), (WEBHOOK, "Webhook (HMAC-SHA256 signed)"), (SLACK, "Slack (incoming webhook)")]
    POSTED_KINDS = (WEBHOOK, SLACK)

    name = models.CharField(max_length=80, unique=True,
                            validators=[RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                                       "Letters, digits, '.', '_' and '-' only.")])
    kind = models.CharField(max_length=10, choices=KIND_CHOICES)
    url = models.URLField(max_length=500, blank=True,
                          help_text="Webhook and Slack: the URL alerts are POSTed to (Slack's incoming webhook URL "
                                    "is a secret: it is never shown in errors or logs).")
    emails = models.CharField(max_length=500, blank=True, validators=[_validate_emails],
                              help_text="Email: comma-separated recipients.")
    secret = models.CharField(max_length=128, default=generate_secret,
                              help_text="Webhook: the HMAC key receivers verify the signature with.")
    min_severity = models.CharField(max_length=10, choices=SEVERITY_CHOICES, default=WARNING)
    rate_limit = models.PositiveIntegerField(default=30, validators=[MinValueValidator(1)],
                                             help_text="At most this many notifications per window; the rest are "
                                                       "suppressed, and counted in the next one sent.")
    rate_window_s = models.PositiveIntegerField(default=3600, validators=[MinValueValidator(1)],
                                                help_text="The rate limit's window in seconds; windows start at "
                                                          "multiples of it since the Unix epoch (3600: each UTC hour).")
    enabled = models.BooleanField(default=True)
    integration = models.OneToOneField(Integration, on_delete=models.CASCADE, related_name="notification_channel",
                                       editable=False)
    # The rate limit's counter: deliveries claimed in the window that starts at window_start.
    window_start = models.DateTimeField(null=True, blank=True, editable=False)
    sent_in_window = models.PositiveIntegerField(default=0, editable=False)
    # Notifications suppressed by the rate limit since the last one sent, which says so.
    suppressed = models.PositiveIntegerField(default=0, editable=False)

    objects = NotificationChannelManager()

    class Meta:
        ordering = ["name"]
        constraints = [
            # what code that skips full_clean() may not store either: the rate limit divides by the window
            models.CheckConstraint(condition=Q(rate_limit__gte=1), name="notification_channel_rate_limit_at_least_1",
                                   violation_error_message="rate_limit must be at least 1."),
            models.CheckConstraint(condition=Q(rate_window_s__gte=1),
                                   name="notification_channel_rate_window_s_at_least_1",
                                   violation_error_message="rate_window_s must be at least 1 second."),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"

    def natural_key(self) -> tuple[str]:
        return (self.name,)

    natural_key.dependencies = ["integrations.integration"]

    @property
    def hourly_cap(self) -> int:
        """The old name of ``rate_limit``, from when the window was always the UTC hour."""
        return self.rate_limit

    @hourly_cap.setter
    def hourly_cap(self, value: int) -> None:
        self.rate_limit = value

    @property
    def integration_name(self) -> str:
        return f"notify.{self.name}"

    def clean(self):
        if self.kind == self.WEBHOOK and not self.url:
            raise ValidationError({"url": "A webhook channel needs a URL."})
        if self.kind == self.SLACK and not self.url:
            raise ValidationError({"url": "A Slack channel needs its incoming webhook's URL."})
        if self.kind == self.SLACK and not _https_or_loopback(self.url):
            raise ValidationError({"url": "A Slack channel's URL must use https "
                                          "(an incoming webhook is https://hooks.slack.com/services/...)."})
        if self.kind == self.EMAIL and not split_emails(self.emails):
            raise ValidationError({"emails": "An email channel needs at least one recipient."})

    def configuration_error(self) -> str | None:
        """What is wrong with this channel's settings, each named by its field; None when it can send.

        ``full_clean`` without the queries (unique name, constraints): checked before each send,
        since code may create a channel without the admin's validation.
        """
        try:
            self.clean_fields(exclude=["integration"])
            self.clean()
        except ValidationError as exc:
            return "; ".join(f"{field}: {' '.join(messages)}" for field, messages in sorted(exc.message_dict.items()))
        return None

    def save(self, *args, **kwargs):
        if self.integration_id is None:
            # Notifications are small and urgent: a few quick retries, never a long wait.
            self.integration, _ = Integration.objects.get_or_create(
                name=self.integration_name,
                defaults={"kind": "external_api", "description": f"Alert notifications to channel {self.name}",
                          "max_retries": 2, "base_delay_ms": 500, "max_delay_ms": 2_000,
                          "attempt_timeout_ms": 5_000, "timeout_ms": 15_000})
        super().save(*args, **kwargs)

    def accepts(self, severity: str) -> bool:
        return self.enabled and SEVERITY_RANK[severity] >= SEVERITY_RANK[self.min_severity]

    def window_start_for(self, now: datetime | None = None) -> datetime:
        """Where the rate limit's window holding ``now`` starts: a multiple of ``rate_window_s`` since the epoch."""
        epoch_s = int(_now(now).timestamp())
        return datetime.fromtimestamp(epoch_s - epoch_s % self.rate_window_s, tz=dt_timezone.utc)

    def claim_slot(self, now: datetime | None = None) -> bool:
        """Take one of this window's ``rate_limit`` notifications; False when they are all taken.

        Atomic in the database, so processes notifying at once never exceed it.
        """
        window = self.window_start_for(now)
        channels = NotificationChannel.objects.filter(pk=self.pk)
        if channels.filter(window_start=window, sent_in_window__lt=F("rate_limit")).update(
                sent_in_window=F("sent_in_window") + 1):
            return True
        # a new window: the first claimer starts it; a claimer that lost the race tries the new window
        if channels.exclude(window_start=window).update(window_start=window, sent_in_window=1):
            return True
        return bool(channels.filter(window_start=window, sent_in_window__lt=F("rate_limit")).update(
            sent_in_window=F("sent_in_window") + 1))

    def take_slot(self, now: datetime | None = None) -> NotificationSlot:
        """Claim a slot of the rate limit for one notification. Refused, the notification is counted
        as suppressed; granted, the slot carries how many were suppressed since the last one sent,
        for this one to say (the count starts again from 0)."""
        channels = NotificationChannel.objects.filter(pk=self.pk)
        if not self.claim_slot(now):
            channels.update(suppressed=F("suppressed") + 1)
            return NotificationSlot(granted=False)
        # taken with a conditional update: two senders never both report the same suppressed ones
        while True:
            count = channels.values_list("suppressed", flat=True).first()
            if not count:
                return NotificationSlot(granted=True)
            if channels.filter(suppressed=count).update(suppressed=0):
                return NotificationSlot(granted=True, suppressed_before=count)


@dataclass(frozen=True)
class NotificationSlot:
    """NotificationChannel.take_slot's answer: true when the notification may be sent."""

    granted: bool
    suppressed_before: int = 0  # notifications the rate limit kept back since the last one sent

    def __bool__(self) -> bool:
        return self.granted


class Delivery(models.Model):
    """One notification of one alert event to one channel, and what became of it."""

    SENDING = "sending"
    SENT = "sent"
    QUEUED = "queued"  # failed; the dead letter queue will send it again
    FAILED = "failed"
    CAPPED = "capped"  # suppressed by the channel's rate limit
    STATUS_CHOICES = [(SENDING, "Sending"), (SENT, "Sent"), (QUEUED, "Queued for redrive"), (FAILED, "Failed"),
                      (CAPPED, "Not sent: rate limit")]

    channel = models.ForeignKey(NotificationChannel, on_delete=models.CASCADE, related_name="deliveries")
    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=15)
    subject = models.CharField(max_length=300)
    body = models.TextField(help_text="The alert event's JSON document: what a webhook receives; the email's text "
                                      "and the Slack message are made from it.")
    status = models.CharField(max_length=10, choices=STATUS_CHOICES, default=SENDING)
    error = models.CharField(max_length=500, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "deliveries"
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.event} alert {self.alert_id} -> {self.channel.name}: {self.status}"

    def mark(self, status: str, error: str = "", attempts: int = 0) -> None:
        self.status = status
        self.error = error[:500]
        self.attempts += attempts
        if status == self.SENT:
            self.sent_at = timezone.now()
        self.save(update_fields=["status", "error", "attempts", "sent_at"])
