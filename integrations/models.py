"""Integrations: every upstream the site calls, and the policy each call runs under."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models, transaction
from django.db.models import F
from django.db.models.functions import Now
from django.dispatch import Signal
from django.utils import timezone

from .resilience import get_engine
from .resilience.breaker import effective_state
from .resilience.policy import (
    KIND_PRESETS,
    KINDS,
    KNOB_NAMES,
    MODE_FORCED_CLOSED,
    MODE_FORCED_OPEN,
    MODE_NORMAL,
    MODES,
    TIMEOUT_INLINE,
    TIMEOUT_THREAD,
    Policy,
)
from .conf import app_settings

logger = logging.getLogger("integrations.faults")

DEFAULT_KIND = "external_api"
MAX_FAULT_MINUTES = 24 * 60
# An operator's breaker actions (operate_breaker), with the words the history records them under.
BREAKER_ACTIONS = {"reset": "manual reset", "open": "forced open", "close": "forced closed"}

# Sent when an integration's policy changed without a save() (a queryset update).
policy_changed = Signal()

_positive = MinValueValidator(1, "Must be at least 1.")
_percent = [MinValueValidator(0, "Must be between 0 and 100."), MaxValueValidator(100, "Must be between 0 and 100.")]


def _above_zero(value):
    if value is not None and value <= 0:
        raise ValidationError("Must be greater than 0.", code="min_value")


def _capacity(value):
    if value is None or not 0 < value <= 1:
        raise ValidationError("Capacity must be in (0, 1]: a share of calls, 1 meaning all of them.", code="range")


class Integration(models.Model):
    """One upstream and its policy. Unset knobs of a new row come from its kind's preset."""

    KIND_CHOICES = [(kind, kind.replace("_", " ").title()) for kind in KINDS]
    MODE_CHOICES = [(mode, mode.replace("_", " ")) for mode in MODES]
    TIMEOUT_CHOICES = [
        (TIMEOUT_THREAD, "thread: the caller never waits past the timeout"),
        (TIMEOUT_INLINE, "inline: the operation enforces its own timeout"),
    ]

    name = models.CharField(
        max_length=100, unique=True,
        validators=[RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                   "Letters, digits, '.', '_' and '-' only, starting with a letter or digit.")],
        help_text="The name code passes to execute(), e.g. 'billing'.",
    )
    kind = models.CharField(max_length=20, choices=KIND_CHOICES, default=DEFAULT_KIND)
    description = models.TextField(blank=True)

    # Circuit breaker
    mode = models.CharField(max_length=20, choices=MODE_CHOICES, default=MODE_NORMAL)
    failure_threshold = models.PositiveIntegerField(validators=[_positive],
                                                    help_text="Consecutive failures that open the breaker.")
    failure_rate_threshold = models.FloatField(validators=_percent,
                                               help_text="Failure rate (%) over the window that opens it; 0: off.")
    slow_call_rate_threshold = models.FloatField(validators=_percent,
                                                 help_text="Slow-call rate (%) over the window that opens it; 0: off.")
    slow_call_ms = models.PositiveIntegerField(validators=[_positive], help_text="A call slower than this is slow.")
    window_size = models.PositiveIntegerField(validators=[_positive], help_text="Calls the rates are measured over.")
    minimum_calls = models.PositiveIntegerField(validators=[_positive],
                                                help_text="Calls needed in the window before the rates count.")
    reset_timeout_s = models.FloatField(validators=[_above_zero], help_text="Seconds open before half-open.")
    half_open_max_calls = models.PositiveIntegerField(validators=[_positive],
                                                      help_text="Trial calls let through at once when half-open.")
    success_threshold = models.PositiveIntegerField(validators=[_positive],
                                                    help_text="Consecutive half-open successes that close it.")
    # Retry
    max_retries = models.PositiveIntegerField(validators=[MaxValueValidator(20)])
    base_delay_ms = models.PositiveIntegerField()
    max_delay_ms = models.PositiveIntegerField()
    backoff_multiplier = models.FloatField(validators=[MinValueValidator(1.0, "Must be at least 1.")])
    jitter = models.BooleanField(help_text="Full jitter: each delay is drawn uniformly in [0, delay].")
    retry_budget_percent = models.FloatField(null=True, blank=True, validators=_percent,
                                             help_text="Retries allowed as a share (%) of calls; blank: no budget.")
    # Timeouts
    attempt_timeout_ms = models.PositiveIntegerField(validators=[_positive])
    timeout_ms = models.PositiveIntegerField(validators=[_positive], help_text="The whole call, retries included.")
    timeout_enforcement = models.CharField(max_length=10, choices=TIMEOUT_CHOICES)
    # Bulkhead
    max_concurrent = models.PositiveIntegerField(validators=[_positive], help_text="Calls in flight per process.")
    bulkhead_wait_ms = models.PositiveIntegerField()
    # Quota
    hourly_limit = models.PositiveIntegerField(null=True, blank=True, validators=[_positive])
    daily_limit = models.PositiveIntegerField(null=True, blank=True, validators=[_positive])
    # Cache
    cache_ttl_s = models.PositiveIntegerField(help_text="0: responses are not cached.")
    cache_version = models.PositiveIntegerField(default=0, editable=False)
    # Degraded mode
    capacity = models.FloatField(validators=[_capacity], help_text="Share of calls let through, in (0, 1].")

    # Game-day fault injection in force (history: FaultInjection); see inject_fault().
    fault_error_percent = models.FloatField(default=0, editable=False)
    fault_latency_ms = models.PositiveIntegerField(default=0, editable=False)
    fault_until = models.DateTimeField(null=True, blank=True, editable=False)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __init__(self, *args, **kwargs):
        # A new row (keyword construction; rows from the database come positionally)
        # takes every knob it was not given from its kind's preset.
        if not args:
            for knob, value in KIND_PRESETS.get(kwargs.get("kind") or DEFAULT_KIND, {}).items():
                kwargs.setdefault(knob, value)
        super().__init__(*args, **kwargs)

    def __str__(self) -> str:
        return self.name

    def clean(self):
        errors = {}
        if self.base_delay_ms is not None and self.max_delay_ms is not None and self.base_delay_ms > self.max_delay_ms:
            errors["base_delay_ms"] = f"Base delay ({self.base_delay_ms} ms) must not exceed max delay ({self.max_delay_ms} ms)."
        if (self.attempt_timeout_ms is not None and self.timeout_ms is not None
                and self.attempt_timeout_ms > self.timeout_ms):
            errors["attempt_timeout_ms"] = (f"Attempt timeout ({self.attempt_timeout_ms} ms) must not exceed the "
                                            f"overall timeout ({self.timeout_ms} ms).")
        if self.minimum_calls is not None and self.window_size is not None and self.minimum_calls > self.window_size:
            errors["minimum_calls"] = (f"Minimum calls ({self.minimum_calls}) must not exceed the window size "
                                       f"({self.window_size}): the rates would never be evaluated.")
        if errors:
            raise ValidationError(errors)

    # -- the policy the engine runs on ----------------------------------------

    def to_policy(self) -> Policy:
        revision = self.updated_at.timestamp() if self.updated_at else 0.0
        return Policy(name=self.name, kind=self.kind, cache_version=self.cache_version, revision=revision,
                      fault_until=self.fault_until.timestamp() if self.fault_until else 0.0,
                      fault_error_percent=self.fault_error_percent, fault_latency_ms=self.fault_latency_ms,
                      **{knob: getattr(self, knob) for knob in KNOB_NAMES})

    def apply_preset(self, kind: str | None = None) -> None:
        """Set every knob to the preset of ``kind`` (default: this row's kind)."""
        if kind is not None:
            self.kind = kind
        for knob, value in KIND_PRESETS[self.kind].items():
            setattr(self, knob, value)

    @classmethod
    def load_policy(cls, name: str) -> Policy | None:
        row = cls.objects.filter(name=name).first()
        return None if row is None else row.to_policy()

    @classmethod
    def register_default(cls, name: str) -> Policy:
        """Auto-registration (RESILIENCE_AUTO_REGISTER): a new name gets the default preset."""
        row, _ = cls.objects.get_or_create(name=name, defaults={"kind": DEFAULT_KIND})
        return row.to_policy()

    # -- live state and operator actions (the admin, API and commands call these) --

    def breaker_snapshot(self):
        return get_engine().store.snapshot(self.to_policy())

    def quota_usage(self):
        return get_engine().store.quota_usage(self.to_policy())

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValidationError({"mode": f"Unknown breaker mode {mode!r}; expected one of {', '.join(MODES)}."})
        self.mode = mode
        self.save(update_fields=["mode", "updated_at"])

    def force_open(self) -> None:
        self.set_mode(MODE_FORCED_OPEN)

    def force_closed(self) -> None:
        self.set_mode(MODE_FORCED_CLOSED)

    def reset_breaker(self, by: str | None = None):
        """Back to normal mode and a closed breaker with clear counts."""
        if self.mode in (MODE_FORCED_OPEN, MODE_FORCED_CLOSED):
            self.set_mode(MODE_NORMAL)
        return get_engine().reset_breaker(self.to_policy(), by)

    def effective_breaker_state(self, snapshot=None) -> str:
        """The state callers meet: a forced mode overrides the breaker's own."""
        return effective_state(self.mode, (snapshot or self.breaker_snapshot()).state)

    def operate_breaker(self, action: str, by: str) -> None:
        """An operator's breaker action (BREAKER_ACTIONS), always left in the history naming ``by``.

        reset: normal mode and a closed breaker with clear counts; open and close: the forced
        modes. A reset that closes a breaker is recorded by its own transition (persistence.py);
        every other action (a mode change, a reset of a closed breaker) makes no transition, so
        its BreakerEvent is written here.
        """
        if action not in BREAKER_ACTIONS:
            raise ValueError(f"unknown breaker action {action!r}; expected one of {', '.join(BREAKER_ACTIONS)}")
        before_mode, before_state = self.mode, self.effective_breaker_state()
        transition = None
        if action == "reset":
            transition = self.reset_breaker(by=by)
        else:
            self.set_mode(MODE_FORCED_OPEN if action == "open" else MODE_FORCED_CLOSED)
        if transition is not None:
            return
        reason = BREAKER_ACTIONS[action]
        if self.mode != before_mode:
            reason = f"{reason}: mode {before_mode} -> {self.mode}"
        BreakerEvent.objects.create(integration=self, from_state=before_state, to_state=self.effective_breaker_state(),
                                    reason=reason[:200], at=timezone.now(), by=by)

    def set_capacity(self, capacity: float) -> None:
        """Degraded mode: only ``capacity`` (0 < capacity <= 1) of the calls proceed; 1 leaves it."""
        try:
            _capacity(capacity)
        except ValidationError as exc:
            raise ValidationError({"capacity": exc.messages}) from None
        self.capacity = capacity
        self.save(update_fields=["capacity", "updated_at"])

    def inject_fault(self, *, error_percent: float = 0, latency_ms: int = 0, minutes: float = 10,
                     by: str = "") -> FaultInjection:
        """Inject errors into ``error_percent`` % of calls and/or ``latency_ms`` into each, for ``minutes``.

        Refused unless RESILIENCE_FAULT_INJECTION is on. Expires by itself.
        """
        if not app_settings.FAULT_INJECTION:
            raise PermissionDenied("Fault injection is off: set RESILIENCE_FAULT_INJECTION=true to allow it.")
        injection = FaultInjection(integration=self, error_percent=error_percent, latency_ms=latency_ms,
                                   starts_at=timezone.now(), created_by=by)
        injection.ends_at = injection.starts_at + timedelta(minutes=minutes) if minutes and minutes > 0 else None
        errors = {}
        if not 0 <= error_percent <= 100:
            errors["error_percent"] = "Must be between 0 and 100."
        if latency_ms is None or latency_ms < 0:
            errors["latency_ms"] = "Must be 0 or more."
        if not error_percent and not latency_ms:
            errors["error_percent"] = "Inject errors, latency, or both."
        if not minutes or not 0 < minutes <= MAX_FAULT_MINUTES:
            errors["minutes"] = f"Must be more than 0 and at most {MAX_FAULT_MINUTES} (an injection always ends)."
        if errors:
            raise ValidationError(errors)
        with transaction.atomic():
            injection.save()
            Integration.objects.filter(pk=self.pk).update(
                fault_error_percent=error_percent, fault_latency_ms=latency_ms, fault_until=injection.ends_at,
                updated_at=Now())
        self.refresh_from_db(fields=["fault_error_percent", "fault_latency_ms", "fault_until", "updated_at"])
        logger.warning("fault injection on %s by %s: %s%% errors, %s ms latency, until %s", self.name,
                       by or "(unknown)", error_percent, latency_ms, injection.ends_at.isoformat())
        policy_changed.send(sender=Integration, instance=self)
        return injection

    def stop_fault(self, by: str = "") -> None:
        """End the fault injection in force now."""
        now = timezone.now()
        with transaction.atomic():
            FaultInjection.objects.filter(integration=self, ends_at__gt=now).update(ends_at=now, stopped_by=by)
            Integration.objects.filter(pk=self.pk).update(fault_error_percent=0, fault_latency_ms=0, fault_until=None,
                                                          updated_at=Now())
        self.refresh_from_db(fields=["fault_error_percent", "fault_latency_ms", "fault_until", "updated_at"])
        logger.warning("fault injection on %s stopped by %s", self.name, by or "(unknown)")
        policy_changed.send(sender=Integration, instance=self)

    @property
    def fault_active(self) -> bool:
        return self.fault_until is not None and self.fault_until > timezone.now()

    def clear_cache(self) -> None:
        """Every cached response and last known value of this integration becomes unreachable.

        The version is bumped in the database, not from this instance, so two
        operators clearing at once (or a stale instance) still move it on.
        """
        Integration.objects.filter(pk=self.pk).update(cache_version=F("cache_version") + 1, updated_at=Now())
        self.refresh_from_db(fields=["cache_version", "updated_at"])
        policy_changed.send(sender=Integration, instance=self)


class BreakerState(models.Model):
    """The breaker of one integration as of its last transition (written at transitions only)."""

    integration = models.OneToOneField(Integration, on_delete=models.CASCADE, related_name="breaker_state")
    state = models.CharField(max_length=10, default="closed")
    opened_at = models.DateTimeField(null=True, blank=True)
    changed_at = models.DateTimeField(null=True, blank=True)
    last_reason = models.CharField(max_length=200, blank=True)
    transitions = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.integration.name}: {self.state}"


class BreakerEvent(models.Model):
    """One breaker transition: the history that survives restarts."""

    integration = models.ForeignKey(Integration, on_delete=models.CASCADE, related_name="breaker_events")
    from_state = models.CharField(max_length=10)
    to_state = models.CharField(max_length=10)
    reason = models.CharField(max_length=200)
    at = models.DateTimeField(db_index=True)
    by = models.CharField(max_length=150, blank=True, help_text="The operator, for manual transitions.")

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["integration", "-at"])]

    def __str__(self) -> str:
        return f"{self.integration.name}: {self.from_state} -> {self.to_state} ({self.reason})"


class FaultInjection(models.Model):
    """A game-day injection of errors or latency: the log of every one, by whom and for how long."""

    integration = models.ForeignKey(Integration, on_delete=models.CASCADE, related_name="fault_injections")
    error_percent = models.FloatField(default=0, validators=_percent)
    latency_ms = models.PositiveIntegerField(default=0)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    created_by = models.CharField(max_length=150, blank=True)
    stopped_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["-starts_at"]

    def __str__(self) -> str:
        return f"{self.integration.name}: {self.error_percent:g}% errors, {self.latency_ms} ms until {self.ends_at}"

    @property
    def active(self) -> bool:
        return self.starts_at <= timezone.now() < self.ends_at
