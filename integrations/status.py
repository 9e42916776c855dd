"""What state an integration is in: one read model that every page renders.

    statuses = read_statuses(Integration.objects.select_related("breaker_state"))
    statuses[0].state          # what callers meet: a forced mode overrides the breaker's own state
    statuses[0].to_dict()      # the same names everywhere (docs/reference.md)

Built once per page from batched reads: the breakers and quotas of every integration on the
page come from the state store in one round trip (Redis: one pipeline), the last hour's figures
from the call figures source in one query. ``scope`` says where breaker and quota were read:
``shared`` (the fleet's, in Redis) or ``process`` (this process's: no Redis configured, or Redis
unreachable right now).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .figures import call_figures
from .models import Integration
from .resilience import get_engine
from .resilience.breaker import CLOSED, OPEN, BreakerSnapshot
from .resilience.policy import MODE_FORCED_CLOSED, MODE_FORCED_OPEN
from .resilience.quota import QuotaUsage

SHARED, PROCESS = "shared", "process"
FIGURES_MINUTES = 60


@dataclass(frozen=True)
class IntegrationStatus:
    integration: Integration
    breaker: BreakerSnapshot
    quota: QuotaUsage
    scope: str  # SHARED or PROCESS: where breaker and quota were read
    in_flight: int  # this process's calls in progress
    figures: dict | None  # the last FIGURES_MINUTES of calls (a CallStatsSummary), None without a source

    @property
    def name(self) -> str:
        return self.integration.name

    @property
    def state(self) -> str:
        """The state callers meet: a forced mode overrides the breaker's own."""
        mode = self.integration.mode
        return OPEN if mode == MODE_FORCED_OPEN else CLOSED if mode == MODE_FORCED_CLOSED else self.breaker.state

    @property
    def own_state(self) -> str:
        """The breaker's own state, whatever the mode."""
        return self.breaker.state

    def to_dict(self) -> dict:
        snapshot = self.breaker
        return {
            "name": self.name,
            "kind": self.integration.kind,
            "mode": self.integration.mode,
            "scope": self.scope,
            "state": self.state,
            "own_state": self.own_state,
            "opened_at": snapshot.opened_at,
            "changed_at": snapshot.changed_at,
            "quota": self.quota.as_dict(),
            "figures": self.figures,
            "in_flight": self.in_flight,
        }


def read_statuses(integrations: Iterable[Integration], *, figures_minutes: int | None = FIGURES_MINUTES
                  ) -> list[IntegrationStatus]:
    """The status of each integration, in order: one store round trip and one figures query in all.

    ``figures_minutes=None`` leaves the figures out (a page that shows none).
    """
    integrations = list(integrations)
    engine = get_engine()
    reads = engine.store.read_many([integration.to_policy() for integration in integrations])
    source = call_figures() if figures_minutes is not None else None
    figures = source.window([integration.pk for integration in integrations], figures_minutes) if source else {}
    shared_store = engine.store.shared
    return [
        IntegrationStatus(
            integration=integration, breaker=snapshot, quota=quota,
            # a shared store that could not reach Redis answered with this process's state
            scope=SHARED if shared_store and snapshot.extra.get("shared", True) else PROCESS,
            in_flight=engine.in_flight(integration.name),
            figures=figures.get(integration.pk),
        )
        for integration, (snapshot, quota) in zip(integrations, reads)
    ]
