"""Integrations: every upstream the site calls, and the policy each call runs under."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import BaseValidator, MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models, transaction
from django.db.models import F
from django.db.models.functions import Now
from django.dispatch import Signal
from django.utils import timezone
from django.utils.deconstruct import deconstructible

from .resilience import get_engine
from .resilience.breaker import effective_state
from .resilience.policy import (
    KIND_PRESETS,
    KINDS,
    KNOB_NAMES,
    KNOBS,
    MODE_FORCED_CLOSED,
    MODE_FORCED_OPEN,
    MODE_NORMAL,
    MODES,
    WINDOW_TIME,
    Knob,
    Policy,
    knob_problems,
)
from .conf import app_settings

logger = logging.getLogger("integrations.faults")

DEFAULT_KIND = "external_api"
MAX_FAULT_MINUTES = 24 * 60
# An operator's breaker actions (operate_breaker), with the words the history records them under.
BREAKER_ACTIONS = {"reset": "manual reset", "open": "forced open", "close": "forced closed"}

# Sent when an integration's policy changed without a save() (a queryset update).
policy_changed = Signal()

KNOBS_BY_NAME = {knob.name: knob for knob in KNOBS}


@deconstructible
class GreaterThanValidator(BaseValidator):
    """The value must be greater than the limit (Django has inclusive bounds only)."""

    code = "min_value"

    def compare(self, value, limit):
        return value <= limit


@deconstructible
class KnobValidator:
    """The value must fit the named Policy knob (for knobs whose rule no Django validator states)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, value) -> None:
        problem = KNOBS_BY_NAME[self.name].problem(value)
        if problem:
            raise ValidationError(problem, code="invalid")

    def __eq__(self, other) -> bool:
        return isinstance(other, KnobValidator) and other.name == self.name


def knob_field(knob: Knob) -> models.Field:
    """The model field of one Policy knob: its type, bounds, choices and help, from the one declaration."""
    validators = []
    if knob.minimum is not None:
        validators.append(MinValueValidator(knob.minimum, knob.bounds_message))
    if knob.above is not None:
        validators.append(GreaterThanValidator(knob.above, knob.bounds_message))
    if knob.maximum is not None:
        validators.append(MaxValueValidator(knob.maximum, knob.bounds_message))
    options = {"help_text": knob.help, "validators": validators}
    if knob.optional:
        options.update(null=True, blank=True)
    if knob.type is bool:
        return models.BooleanField(**options)
    if knob.type is int:
        return models.PositiveIntegerField(**options)
    if knob.type is float:
        return models.FloatField(**options)
    if knob.many:
        validators.append(KnobValidator(knob.name))
        return models.CharField(max_length=200, **options)
    return models.CharField(max_length=20, choices=knob.choices, **options)


# Named by the first migrations, which validated these knobs before they were declared on the Policy.
def _above_zero(value):
    if value is not None and value <= 0:
        raise ValidationError("Must be greater than 0.", code="min_value")


def _capacity(value):
    if value is None or not 0 < value <= 1:
        raise ValidationError("Capacity must be in (0, 1]: a share of calls, 1 meaning all of them.", code="range")


class IntegrationManager(models.Manager):
    def get_by_natural_key(self, name: str) -> Integration:
        """Its name identifies an integration in fixtures and backups (integrations/backup.py)."""
        return self.get(name=name)


class Integration(models.Model):
    """One upstream and its policy. Unset knobs of a new row come from its kind's preset."""

    KIND_CHOICES = [(kind, kind.replace("_", " ").title()) for kind in KINDS]
    MODE_CHOICES = list(KNOBS_BY_NAME["mode"].choices)

    name = models.CharField(
        max_length=100, unique=True,
        validators=[RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                   "Letters, digits, '.', '_' and '-' only, starting with a letter or digit.")],
        help_text="The name code passes to execute(), e.g. 'billing'.",
    )
    kind = models.CharField(max_length=20, choices=KIND_CHOICES, default=DEFAULT_KIND)
    description = models.TextField(blank=True)

    # The knobs (mode, breaker, retry, timeouts, bulkhead, quota, cache, capacity) are added
    # below from their one declaration, the Policy's fields (integrations.resilience.policy).
    cache_version = models.PositiveIntegerField(default=0, editable=False)

    # Game-day fault injection in force (history: FaultInjection); see inject_fault().
    fault_error_percent = models.FloatField(default=0, editable=False)
    fault_latency_ms = models.PositiveIntegerField(default=0, editable=False)
    fault_until = models.DateTimeField(null=True, blank=True, editable=False)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = IntegrationManager()

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

    def natural_key(self) -> tuple[str]:
        return (self.name,)

    def clean(self):
        errors = knob_problems({knob: getattr(self, knob) for knob in KNOB_NAMES})
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

    def breaker_window(self) -> dict:
        """What the breaker's rates are measured over: ``type`` (count or time), ``size`` (a count
        window's calls) and ``duration_s`` (a time window's seconds), the unused one None."""
        timed = self.window_type == WINDOW_TIME
        return {"type": self.window_type, "size": None if timed else self.window_size,
                "duration_s": self.window_duration_s if timed else None}

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
        problem = KNOBS_BY_NAME["capacity"].problem(capacity)
        if problem:
            raise ValidationError({"capacity": problem})
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

    def clear_cache(self, *, key: str | None = None, prefix: str | None = None) -> int:
        """Every cached response and last known value of this integration (or those of the string
        cache ``key``, or of the string keys starting with ``prefix``) becomes unreachable in every
        process: the cache's invalidation record reaches every process's L1 within a second
        (integrations/resilience/cache.py). The record's new generation; CacheUnavailable when the
        shared cache cannot record it (nothing is cleared).

        Clearing everything also bumps the version in the database, not from this instance, so two
        operators clearing at once (or a stale instance) still move it on.
        """
        if key is not None and prefix is not None:
            raise ValueError("clear a key or a prefix, not both")
        cache = get_engine().cache
        if key is not None:
            return cache.clear(self.name, key=key, policy=self.to_policy())
        if prefix is not None:
            return cache.clear(self.name, prefix=prefix)
        generation = cache.clear(self.name)  # first: a cache that fails (CacheUnavailable) changes nothing
        Integration.objects.filter(pk=self.pk).update(cache_version=F("cache_version") + 1, updated_at=Now())
        self.refresh_from_db(fields=["cache_version", "updated_at"])
        policy_changed.send(sender=Integration, instance=self)
        return generation


for _knob in KNOBS:
    Integration.add_to_class(_knob.name, knob_field(_knob))
del _knob


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
    error_percent = models.FloatField(default=0, validators=[MinValueValidator(0, "Must be between 0 and 100."),
                                                             MaxValueValidator(100, "Must be between 0 and 100.")])
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
