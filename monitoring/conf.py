"""Monitoring's settings, their defaults and validation (integrations/conf.py explains the pattern)."""

from __future__ import annotations

import os
from pathlib import Path

from integrations.conf import AppSettings, Setting, integer, string

from .rules import settings_rules

WATCHDOG_DEFAULTS = {
    "window_minutes": 60,
    "recent_minutes": 5,
    "min_calls": 20,
    "error_warning_percent": 30,
    "error_critical_percent": 70,
    "slow_percent": 50,
    "open_minutes": 5,
    "unavailable_failure_percent": 50,
    "unavailable_timeout_percent": 30,
    "quota_warning_percent": 80,
    "quota_critical_percent": 95,
    "dlq_pending": 100,
    "dlq_minutes": 10,
    "traffic_factor": 3,
    "fallback_warning_percent": 50,
    "fallback_critical_percent": 70,
}


def watchdog(value) -> dict:
    """A dict of thresholds; the ones it leaves out keep their defaults."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a dict of thresholds such as {{'min_calls': 50}}; got {value!r}.")
    unknown = sorted(str(name) for name in value if name not in WATCHDOG_DEFAULTS)
    if unknown:
        raise ValueError(f"[{unknown[0]!r}] is not a threshold; the thresholds are {', '.join(WATCHDOG_DEFAULTS)}.")
    for name, threshold in value.items():
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"[{name!r}] must be a whole number, at least 1; got {threshold!r}.")
    return {**WATCHDOG_DEFAULTS, **value}


def directory_or_empty(value) -> str:
    value = string()(value)
    if value and not Path(value).is_dir():
        raise ValueError(f"names {value!r}, which is not a directory.")
    return value


monitoring_settings = AppSettings("monitoring", {
    "STATS_FLUSH_S": Setting(10, integer(0), "How often each process writes its call statistics; 0: no writer."),
    "STATS_RETENTION_DAYS": Setting(7, integer(1), "Call statistics and health check results are kept this long."),
    "WATCHDOG": Setting({}, watchdog, "Watchdog thresholds, e.g. {'min_calls': 50}; the rest keep their defaults."),
    "WATCHDOG_RULES": Setting([], settings_rules,
                              "User-defined watchdog rules: a list of {'name', 'metric' (dotted path or registered "
                              "metric), 'warning', 'critical', 'direction' ('above'|'below'), 'min_samples', "
                              "'description', 'unit'}."),
    "METRICS_TOKEN": Setting("", string(one_line=True), "Bearer token required on the metrics view; empty: open."),
})

# prometheus_client reads the environment variable itself, at import: the setting defaults to it.
metrics_settings = AppSettings("monitoring", {
    "PROMETHEUS_MULTIPROC_DIR": Setting(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""), directory_or_empty,
                                        "prometheus_client's multiprocess directory (gunicorn)."),
}, prefix="", check_series=2)
