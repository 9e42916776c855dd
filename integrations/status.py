"""What state an integration is in: one read model that every page renders.

    statuses = read_statuses(Integration.objects.select_related("breaker_state"))
    statuses[0].state          # what callers meet: a forced mode overrides the breaker's own state
    statuses[0].to_dict()      # the same names everywhere (docs/reference.md)

Built once per page from batched reads: the breakers and quotas of every integration on the
page come from the state store in one round trip (Redis: one pipeline), the last hour's figures
from the call figures source in one query. ``scope`` says where breaker and quota were read:

- ``shared``: the fleet's, in Redis;
- ``process``: this process's engine (no Redis configured, or Redis unreachable right now): right
  for a page served by the process that makes the calls;
- ``recorded``: for a process that makes no calls (a management command) without Redis: the
  breaker as of its last transition recorded by any process (BreakerState) and the quota as the
  attempts this hour and today in the call figures, summed over every process.

The API, the admin, the System health page, the metrics scrape, /api/health and
``manage.py resilience status`` all render these objects; none reads the store itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable

from .figures import call_figures
from .levels import ratio
from .models import BreakerState, Integration
from .resilience import get_engine
from .resilience.breaker import CLOSED, BreakerSnapshot, effective_state
from .resilience.quota import DAY, HOUR, QuotaUsage, window_start

SHARED, PROCESS, RECORDED = "shared", "process", "recorded"
FIGURES_MINUTES = 60


@dataclass(frozen=True)
class IntegrationStatus:
    integration: Integration
    breaker: BreakerSnapshot
    quota: QuotaUsage
    scope: str  # SHARED, PROCESS or RECORDED: where breaker and quota were read
    in_flight: int  # this process's calls in progress
    concurrency_limit: int  # this process's bulkhead limit now (max_concurrent, or the adaptive limit)
    figures: dict | None  # the last FIGURES_MINUTES of calls (a CallStatsSummary), None without a source
    process_cache: dict  # this process's cache hits and misses since it started

    @property
    def name(self) -> str:
        return self.integration.name

    @property
    def state(self) -> str:
        """The state callers meet: a forced mode overrides the breaker's own."""
        return effective_state(self.integration.mode, self.breaker.state)

    @property
    def own_state(self) -> str:
        """The breaker's own state, whatever the mode."""
        return self.breaker.state

    @property
    def cache(self) -> dict:
        """Cache hits and misses: over the figures' window (every process) when there are figures,
        else this process's since it started; ``source`` says which."""
        if self.figures is not None:
            hits, misses, source = self.figures["cache_hits"], self.figures["cache_misses"], "figures"
        else:
            hits, misses, source = self.process_cache["hits"], self.process_cache["misses"], PROCESS
        return {"hits": hits, "misses": misses, "hit_ratio": ratio(hits, hits + misses), "source": source,
                # this process's L1 (in-process) entries and their average age
                "entries": self.process_cache.get("entries", 0),
                "average_age_s": self.process_cache.get("average_age_s")}

    def to_dict(self) -> dict:
        """The status as a JSON-ready document (times in ISO 8601, UTC)."""
        snapshot = self.breaker
        quota = self.quota.as_dict()
        quota.pop("integration")
        for window in ("hourly", "daily"):
            quota[window]["resets_at"] = _iso(quota[window]["resets_at"])
        return {
            "name": self.name,
            "kind": self.integration.kind,
            "mode": self.integration.mode,
            "scope": self.scope,
            "state": self.state,
            "own_state": self.own_state,
            "opened_at": _iso(snapshot.opened_at),
            "changed_at": _iso(snapshot.changed_at),
            "quota": quota,
            "figures": self.figures,
            "cache": self.cache,
            "in_flight": self.in_flight,
            "concurrency": {"mode": self.integration.bulkhead_mode, "limit": self.concurrency_limit,
                            "max": self.integration.max_concurrent},
        }


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


def _timestamp(value) -> float | None:
    return value.timestamp() if value else None


def recorded_breaker(integration: Integration) -> BreakerSnapshot:
    """The breaker as of its last recorded transition (closed when it never had one)."""
    try:
        row = integration.breaker_state
    except BreakerState.DoesNotExist:
        row = BreakerState(state=CLOSED)
    return BreakerSnapshot(integration=integration.name, state=row.state, mode=integration.mode,
                           opened_at=_timestamp(row.opened_at), changed_at=_timestamp(row.changed_at),
                           consecutive_failures=0, consecutive_successes=0, half_open_in_flight=0,
                           window_calls=0, window_failures=0, window_slow=0, window_retries=0,
                           extra={"recorded": True})


def recorded_quotas(integrations: list[Integration], now: float) -> list[QuotaUsage]:
    """Each integration's quota use from the call figures (every process's attempts), in one query;
    zeros without a figures source."""
    hour, day = window_start(now, HOUR), window_start(now, DAY)
    source = call_figures()
    used = (source.attempts([i.pk for i in integrations], datetime.fromtimestamp(hour, tz=timezone.utc),
                            datetime.fromtimestamp(day, tz=timezone.utc)) if source else {})
    return [QuotaUsage(i.name, used.get(i.pk, {}).get("hour", 0), i.hourly_limit, used.get(i.pk, {}).get("day", 0),
                       i.daily_limit, hour + HOUR, day + DAY) for i in integrations]


def read_statuses(integrations: Iterable[Integration], *, figures_minutes: int | None = FIGURES_MINUTES,
                  calling_process: bool = True) -> list[IntegrationStatus]:
    """The status of each integration, in order: one store round trip and one figures query in all.

    ``figures_minutes=None`` leaves the figures out (a page that shows none).
    ``calling_process=False`` (a management command): without Redis, read the recorded state
    (scope ``recorded``) rather than this process's, which has seen no calls.
    """
    integrations = list(integrations)
    engine = get_engine()
    source = call_figures() if figures_minutes is not None else None
    figures = source.window([integration.pk for integration in integrations], figures_minutes) if source else {}
    if engine.store.shared or calling_process:
        reads = engine.store.read_many([integration.to_policy() for integration in integrations])
        # a shared store that could not reach Redis answered with this process's state
        scopes = [SHARED if engine.store.shared and snapshot.extra.get("shared", True) else PROCESS
                  for snapshot, _ in reads]
    else:
        quotas = recorded_quotas(integrations, engine.clock.time())
        reads = [(recorded_breaker(integration), quota) for integration, quota in zip(integrations, quotas)]
        scopes = [RECORDED] * len(integrations)
    return [
        IntegrationStatus(
            integration=integration, breaker=snapshot, quota=quota, scope=scope,
            in_flight=engine.in_flight(integration.name),
            concurrency_limit=engine.concurrency_limit(integration.name) or integration.max_concurrent,
            figures=figures.get(integration.pk),
            process_cache=engine.cache_stats(integration.name),
        )
        for integration, (snapshot, quota), scope in zip(integrations, reads, scopes)
    ]
