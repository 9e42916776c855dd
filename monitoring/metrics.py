"""The product's Prometheus metrics that the engine's events drive.

Counters and the latency histogram are updated by subscribers to the
engine's events; the engine knows nothing of Prometheus. ``record_call`` runs
in the caller's thread after every guarded call, so it binds an
integration's labelled series once and keeps them: ``.labels()`` costs more
than the update itself. Gauges of live state (breaker state, quota usage, dead
letters, alerts) are not kept here: they are read when /metrics is scraped
(``metrics_scrape.py``). docs/metrics.md lists every metric.

Under gunicorn, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
set by deploy/gunicorn.conf.py) keeps each worker's values in files that a
scrape merges: counters and histograms are summed over all workers, dead
ones included, and each gauge says how its workers' values combine.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from integrations.resilience.events import CallFinished, EventBus, SharedStateChanged, StateTransition
from integrations.resilience.events import bus as engine_bus

# The ``outcome`` of a call that met no failure; otherwise the failure's ErrorCategory value.
SUCCESS = "success"

# Seconds. A guarded call lasts at most its timeout_ms: 5 to 60 s in the presets.
CALL_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

CALLS = Counter(
    "resilience_calls",
    "Guarded calls, by outcome (success, or the category of the failure met, even when a fallback "
    "then served the value) and by source (live, cache, fallback).",
    ["integration", "outcome", "source"],
)
CALL_DURATION = Histogram(
    "resilience_call_duration_seconds",
    "Duration of guarded calls as the caller saw it: retries, backoff and fallbacks included.",
    ["integration"],
    buckets=CALL_DURATION_BUCKETS,
)
RETRIES = Counter("resilience_retries", "Attempts made after the first one of a call.", ["integration"])
FALLBACKS = Counter(
    "resilience_fallbacks",
    "Calls whose value a fallback served, by fallback kind (cache, last_known, value, call).",
    ["integration", "kind"],
)
CACHE_HITS = Counter("resilience_cache_hits", "Cacheable calls served from a fresh cached response.", ["integration"])
CACHE_MISSES = Counter("resilience_cache_misses", "Cacheable calls that found no fresh cached response.",
                       ["integration"])
BREAKER_TRANSITIONS = Counter(
    "resilience_breaker_transitions",
    "Circuit breaker transitions (closed, open, half_open), operators' resets included.",
    ["integration", "from_state", "to_state"],
)
# livemax: 1 while any running worker is on per-process state; a dead worker's value leaves with it.
SHARED_STATE_FALLBACK = Gauge(
    "resilience_shared_state_fallback",
    "1 while shared state (Redis) is lost and calls run on per-process state; 0 otherwise "
    "(also 0 without REDIS_URL, where per-process state is the configuration, not a fallback).",
    multiprocess_mode="livemax",
)


class _IntegrationSeries:
    """One integration's children of the call metrics, bound on its first call."""

    __slots__ = ("integration", "duration", "retries", "cache_hits", "cache_misses", "_calls", "_fallbacks")

    def __init__(self, integration: str) -> None:
        self.integration = integration
        self.duration = CALL_DURATION.labels(integration)
        self.retries = RETRIES.labels(integration)
        self.cache_hits = CACHE_HITS.labels(integration)
        self.cache_misses = CACHE_MISSES.labels(integration)
        self._calls: dict[tuple[str, str], Counter] = {}
        self._fallbacks: dict[str, Counter] = {}

    def calls(self, outcome: str, source: str) -> Counter:
        child = self._calls.get((outcome, source))
        if child is None:
            child = self._calls[(outcome, source)] = CALLS.labels(self.integration, outcome, source)
        return child

    def fallbacks(self, kind: str) -> Counter:
        child = self._fallbacks.get(kind)
        if child is None:
            child = self._fallbacks[kind] = FALLBACKS.labels(self.integration, kind)
        return child


_series: dict[str, _IntegrationSeries] = {}


def series_for(integration: str) -> _IntegrationSeries:
    series = _series.get(integration)
    if series is None:
        series = _series.setdefault(integration, _IntegrationSeries(integration))
    return series


def record_call(event: CallFinished) -> None:
    series = series_for(event.integration)
    series.calls(event.category or SUCCESS, event.source).inc()
    series.duration.observe(event.latency_ms / 1000)
    if event.retries:
        series.retries.inc(event.retries)
    if event.cache is not None:
        (series.cache_hits if event.cache == "hit" else series.cache_misses).inc()
    if event.fallback_used is not None:
        series.fallbacks(event.fallback_used).inc()


def record_transition(event: StateTransition) -> None:
    transition = event.transition
    BREAKER_TRANSITIONS.labels(transition.integration, transition.from_state, transition.to_state).inc()


def record_shared_state(event: SharedStateChanged) -> None:
    SHARED_STATE_FALLBACK.set(0 if event.shared else 1)


def install(bus: EventBus | None = None) -> None:
    """Subscribe the metrics to an engine's events (the process engine's by default); idempotent.

    Monitoring's AppConfig.ready() calls it; tests pass the bus of the engine they build.
    """
    bus = engine_bus if bus is None else bus
    bus.subscribe(CallFinished, record_call)
    bus.subscribe(StateTransition, record_transition)
    bus.subscribe(SharedStateChanged, record_shared_state)
