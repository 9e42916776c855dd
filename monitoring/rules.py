"""User-defined watchdog rules on business metrics (a fraud rate, an enrichment rate, ...).

A *metric* is a function of the run's time that returns a number, ``None`` (no data
now), a ``Measure(value, samples)``, or a mapping ``{integration name or None: any
of those}`` for one value per integration (``None`` as the key: the whole site).
A *rule* compares a metric with a warning and a critical level, ``direction``
"above" (a finding when the value is above the level) or "below".

Each watchdog run (monitoring/watchdog.py, ``evaluate_rules``) evaluates every rule beside the built-in
ones: a finding raises an alert of kind ``rule:<name>`` (one per integration the
metric names), a worse level escalates it, a repeat counts an occurrence, and the
alert resolves when the value is back on the right side of the warning level (or
the metric has no data), notifications included, exactly like the built-in alerts.
A metric that raises, or returns something that is not a value, makes its rule
*erroring*: logged with the exception, shown in the report and on the health page,
its active alerts left as they are; the other rules still run.

Rules are registered in code (``register_metric`` and ``register_rule``, from an
app's ``ready()``) or declared in ``settings.RESILIENCE_WATCHDOG_RULES``
(validated by ``manage.py check`` and at first use, errors naming the field).
docs/monitoring.md has a worked example.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, NamedTuple

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

ABOVE, BELOW = "above", "below"
DIRECTIONS = (ABOVE, BELOW)
KIND_PREFIX = "rule:"
NAME_MAX_LENGTH = 64
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# The states of a rule in a report: its worst value's severity (the alerts' severities), or why there is none.
HEALTHY, WARNING_STATE, CRITICAL_STATE, NO_DATA, ERROR = "healthy", "warning", "critical", "no_data", "error"
RULE_FIELDS = ("name", "metric", "warning", "critical", "direction", "min_samples", "description", "unit")


class Measure(NamedTuple):
    """A metric's value with how many samples it was computed from (for a rule's ``min_samples``)."""

    value: float | None
    samples: int


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[datetime], Any]
    description: str = ""
    unit: str = ""


@dataclass(frozen=True)
class Rule:
    name: str
    metric: Metric
    warning: float | None
    critical: float | None
    direction: str = ABOVE
    min_samples: int = 0
    description: str = ""

    @property
    def kind(self) -> str:
        """The kind of its alerts: one active alert per rule and integration."""
        return KIND_PREFIX + self.name

    @property
    def error_kind(self) -> str:
        """The kind of the alert that its metric is failing (a name holds no ':', so no rule's kind is this)."""
        return f"{self.kind}:error"

    def severity(self, value: float) -> str | None:
        def past(level):
            return level is not None and (value > level if self.direction == ABOVE else value < level)

        return CRITICAL_STATE if past(self.critical) else WARNING_STATE if past(self.warning) else None

    def as_dict(self) -> dict:
        return {"name": self.name, "metric": self.metric.name, "description": self.description or
                self.metric.description, "unit": self.metric.unit, "warning": self.warning,
                "critical": self.critical, "direction": self.direction, "min_samples": self.min_samples}


_metrics: dict[str, Metric] = {}
_rules: dict[str, Rule] = {}


def _fail(where: str, field_name: str, message: str) -> None:
    raise ImproperlyConfigured(f"{where}: {field_name!r} {message}")


def _name(where: str, value) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value) or len(value) > NAME_MAX_LENGTH:
        _fail(where, "name", f"must be letters, digits, '_' or '-' (at most {NAME_MAX_LENGTH}, starting with a "
                             f"letter or digit); got {value!r}.")
    return value


def _text(where: str, field_name: str, value) -> str:
    if not isinstance(value, str):
        _fail(where, field_name, f"must be a string; got {value!r}.")
    return value


def _level(where: str, field_name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(where, field_name, f"must be a number or None; got {value!r}.")
    return value


def register_metric(name: str, fn: Callable[[datetime], Any], *, description: str = "", unit: str = "") -> Metric:
    """Register ``fn(now)`` as the metric ``name``; see the module docstring for what it returns."""
    where = f"metric {name!r}"
    name = _name(where, name)
    if not callable(fn):
        _fail(where, "fn", f"must be a function of the run's time; got {fn!r}.")
    if name in _metrics and _metrics[name].fn is not fn:
        _fail(where, "name", "is already registered with another function.")
    metric = _metrics[name] = Metric(name, fn, _text(where, "description", description), _text(where, "unit", unit))
    return metric


def unregister_metric(name: str) -> None:
    """Forget a metric (and the rules registered on it)."""
    _metrics.pop(name, None)
    for rule_name in [n for n, rule in _rules.items() if rule.metric.name == name]:
        del _rules[rule_name]


def build_rule(where: str, name, *, metric, warning=None, critical=None, direction=ABOVE, min_samples=0,
               description="") -> Rule:
    """A validated Rule; ``metric`` is a registered metric's name, a dotted path to a function or a function."""
    name = _name(where, name)
    if isinstance(metric, Metric):
        resolved = metric
    elif isinstance(metric, str) and metric in _metrics:
        resolved = _metrics[metric]
    elif isinstance(metric, str) and "." in metric:
        try:
            fn = import_string(metric)
        except ImportError as exc:
            _fail(where, "metric", f"cannot be imported: {exc}")
        if not callable(fn):
            _fail(where, "metric", f"names {fn!r}, which is not a function.")
        resolved = Metric(metric, fn)
    elif callable(metric):
        resolved = Metric(getattr(metric, "__qualname__", name), metric)
    else:
        known = ", ".join(sorted(_metrics)) or "none"
        _fail(where, "metric", f"must be a registered metric (registered: {known}), a dotted path to a function "
                               f"or a function; got {metric!r}.")
    if direction not in DIRECTIONS:
        _fail(where, "direction", f"must be 'above' or 'below'; got {direction!r}.")
    warning, critical = _level(where, "warning", warning), _level(where, "critical", critical)
    if warning is None and critical is None:
        _fail(where, "warning", "or 'critical' must be set: a rule needs at least one level.")
    if warning is not None and critical is not None:
        if direction == ABOVE and warning > critical:
            _fail(where, "warning", f"({warning}) must not be above 'critical' ({critical}) for direction 'above'.")
        if direction == BELOW and warning < critical:
            _fail(where, "warning", f"({warning}) must not be below 'critical' ({critical}) for direction 'below'.")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
        _fail(where, "min_samples", f"must be a whole number, at least 0; got {min_samples!r}.")
    return Rule(name, resolved, warning, critical, direction, min_samples, _text(where, "description", description))


def register_rule(name: str, *, metric, warning: float | None = None, critical: float | None = None,
                  direction: str = ABOVE, min_samples: int = 0, description: str = "") -> Rule:
    """Register a rule; raises ImproperlyConfigured naming the bad field (see ``build_rule``)."""
    where = f"watchdog rule {name!r}"
    rule = build_rule(where, name, metric=metric, warning=warning, critical=critical, direction=direction,
                      min_samples=min_samples, description=description)
    if rule.name in _rules:
        _fail(where, "name", "is already registered.")
    _rules[rule.name] = rule
    return rule


def unregister_rule(name: str) -> None:
    _rules.pop(name, None)


def settings_rules(value) -> list[Rule]:
    """The validator of RESILIENCE_WATCHDOG_RULES: a list of dicts with RULE_FIELDS' keys."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of rules such as [{{'name': 'fraud_rate', 'metric': 'shop.metrics.fraud_rate', "
                         f"'warning': 50, 'critical': 70}}]; got {value!r}.")
    built, seen = [], set()
    for index, entry in enumerate(value):
        where = f"[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a dict; got {entry!r}.")
        unknown = sorted(str(key) for key in entry if key not in RULE_FIELDS)
        if unknown:
            raise ValueError(f"{where}[{unknown[0]!r}] is not a rule field; the fields are {', '.join(RULE_FIELDS)}.")
        for required in ("name", "metric"):
            if required not in entry:
                raise ValueError(f"{where}[{required!r}] is required.")
        fields = dict(entry)
        unit = fields.pop("unit", "")
        try:
            rule = build_rule(where, fields.pop("name"), **fields)
            if unit:
                rule = Rule(rule.name, Metric(rule.metric.name, rule.metric.fn, rule.metric.description,
                                              _text(where, "unit", unit)),
                            rule.warning, rule.critical, rule.direction, rule.min_samples, rule.description)
        except ImproperlyConfigured as exc:
            # "[0]: 'warning' must ..." -> "[0]['warning'] must ..."
            message = str(exc)
            match = re.match(r"^(\[\d+\]): '([a-z_]+)' (.*)$", message, re.S)
            raise ValueError(f"{match[1]}[{match[2]!r}] {match[3]}" if match else message) from None
        if rule.name in seen:
            raise ValueError(f"{where}['name'] {rule.name!r} is declared twice.")
        seen.add(rule.name)
        built.append(rule)
    return built


def registered_rules() -> list[Rule]:
    """The rules registered with ``register_rule``, in order (``watchdog.all_rules`` adds the settings' ones)."""
    return list(_rules.values())
