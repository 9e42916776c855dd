"""What a scrape of /metrics renders: every process's metrics, then gauges of live state.

Live state is not a per-process value to merge. Breaker state and quota usage
come from the state store (shared through Redis when REDIS_URL is set, the
answering worker's own otherwise), dead letters and alerts from the database.
The process that answers the scrape reads them once and never writes them to
the multiprocess files, so N gunicorn workers do not report them N times.

A source that fails to read (the database is down, say) is logged and
reported as ``resilience_metrics_source_up{source} 0``; the rest of the scrape,
the call counters above all, is still served. A source whose model is not
installed (the dead letter queue, alerts) is left out.
"""

from __future__ import annotations

import functools
import importlib
import logging

from django.db import transaction
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from integrations.models import Integration
from integrations.status import read_statuses
from integrations.resilience.breaker import CLOSED, HALF_OPEN, OPEN
from .conf import metrics_settings

logger = logging.getLogger("monitoring.metrics")

BREAKER_STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
DEAD_LETTER_MODEL = ("integrations.dlq.models", "DeadLetter")
ALERT_MODEL = ("monitoring.models", "Alert")
# The gauges that exist only once their model is installed.
DEAD_LETTERS_METRIC = "resilience_dead_letters"
ALERTS_METRIC = "resilience_alerts_open"


@functools.cache
def optional_model(module_path: str, class_name: str):
    """The model class, or None while its module (built by another part of the project) does not exist."""
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_path == exc.name or module_path.startswith(exc.name + ".")):
            return None
        raise
    return getattr(module, class_name, None)


def integration_families() -> list[GaugeMetricFamily]:
    state = GaugeMetricFamily(
        "resilience_breaker_state",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open (forced modes count as what they force); "
        "mode is the breaker mode (normal, metrics_only, forced_open, forced_closed).",
        labels=["integration", "mode"],
    )
    quota = GaugeMetricFamily(
        "resilience_quota_usage_ratio",
        "Share of the quota window used (1 = limit reached); only windows with a limit.",
        labels=["integration", "window"],
    )
    slow_call = GaugeMetricFamily(
        "resilience_slow_call_threshold_seconds",
        "The integration's slow_call_ms, in seconds: the latency alert's threshold.",
        labels=["integration"],
    )
    concurrency = GaugeMetricFamily(
        "resilience_concurrency_limit",
        "This process's bulkhead limit: max_concurrent, or where bulkhead_mode=adaptive has it now.",
        labels=["integration", "mode"],
    )
    window_calls = GaugeMetricFamily(
        "resilience_breaker_window_calls",
        "Calls in the breaker's window now: the last window_size calls (window=count) or the calls of the last "
        "window_duration_s seconds (window=time).",
        labels=["integration", "window"],
    )
    window_failures = GaugeMetricFamily(
        "resilience_breaker_window_failure_ratio",
        "Share of the calls in the breaker's window that failed (what failure_rate_threshold is held against); "
        "left out while the window has no calls.",
        labels=["integration", "window"],
    )
    for status in read_statuses(Integration.objects.all(), figures_minutes=None):  # one store round trip
        integration, name, usage, snapshot = status.integration, status.name, status.quota, status.breaker
        state.add_metric([name, integration.mode], BREAKER_STATE_VALUES[status.state])
        window_calls.add_metric([name, integration.window_type], snapshot.window_calls)
        if snapshot.failure_rate is not None:
            window_failures.add_metric([name, integration.window_type], snapshot.failure_rate / 100)
        for window, ratio in (("hourly", usage.hourly_ratio), ("daily", usage.daily_ratio)):
            if ratio is not None:
                quota.add_metric([name, window], ratio)
        slow_call.add_metric([name], integration.slow_call_ms / 1000)
        concurrency.add_metric([name, integration.bulkhead_mode], status.concurrency_limit)
    return [state, window_calls, window_failures, quota, slow_call, concurrency]


def counts_family(name: str, documentation: str, label: str, counts: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, count in sorted(counts.items()):
        family.add_metric([key], count)
    return family


def dead_letter_families() -> list[GaugeMetricFamily] | None:
    model = optional_model(*DEAD_LETTER_MODEL)
    if model is None:
        return None
    by_status = model.objects.stats()["by_status"]
    return [counts_family(DEAD_LETTERS_METRIC, "Dead letter entries by status.", "status", by_status)]


def alert_families() -> list[GaugeMetricFamily] | None:
    model = optional_model(*ALERT_MODEL)
    if model is None:
        return None
    by_severity = model.objects.open_counts_by_severity()
    return [counts_family(ALERTS_METRIC, "Alerts not resolved yet (open or acknowledged), by severity.",
                          "severity", by_severity)]


LIVE_STATE_SOURCES = (
    ("integrations", integration_families),
    ("dead_letters", dead_letter_families),
    ("alerts", alert_families),
)


class LiveStateCollector:
    """The gauges read at scrape time, in the process that answers the scrape."""

    def collect(self):
        source_up = GaugeMetricFamily(
            "resilience_metrics_source_up",
            "1 when this scrape read the source of its live gauges, 0 when reading it failed (see the logs).",
            labels=["source"],
        )
        for source, read in LIVE_STATE_SOURCES:
            try:
                with transaction.atomic():  # a savepoint inside a transaction: one failed query spoils no other source
                    families = read()
            except Exception:  # noqa: BLE001 - one unreadable source must not blind the whole scrape
                logger.exception("metrics: could not read %s for the scrape", source)
                source_up.add_metric([source], 0)
                continue
            if families is None:
                continue
            yield from families
            source_up.add_metric([source], 1)
        yield source_up


def scrape_registry() -> CollectorRegistry:
    """The metrics a scrape renders: merged across workers in multiprocess mode, else this process's own."""
    registry = CollectorRegistry()
    if metrics_settings.PROMETHEUS_MULTIPROC_DIR:
        MultiProcessCollector(registry, path=metrics_settings.PROMETHEUS_MULTIPROC_DIR)
    else:
        registry.register(REGISTRY)
    registry.register(LiveStateCollector())
    return registry


def render() -> bytes:
    return generate_latest(scrape_registry())
