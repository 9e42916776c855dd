"""Where integrations get the call figures that monitoring keeps: a source installed by the
monitoring app, the twin of the policy source the engine has (``install_policy_source``).

integrations never imports monitoring (the apps depend one way); its API, admin and commands
ask this seam instead, and show no figures when no source is installed (monitoring not in
INSTALLED_APPS). The source is an object with:

- ``window(integration_ids, minutes)``: per id, the calls over the last ``minutes`` as the API's
  CallStatsSummary (calls, successes, success_rate, latency_p95_ms, cache_hits, cache_misses,
  cache_hit_ratio, ...), zeros for an integration without calls;
- ``attempts(integration_ids, hour_start, day_start)``: per id, ``{"hour": n, "day": n}``, the
  upstream attempts since each, summed over every process (quota use without Redis).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol


class CallFigures(Protocol):
    def window(self, integration_ids: list[int], minutes: int) -> dict[int, dict]: ...

    def attempts(self, integration_ids: list[int], hour_start: datetime, day_start: datetime) -> dict[int, dict]: ...


_source: dict[str, CallFigures | None] = {"figures": None}


def install_call_figures(source: CallFigures | None) -> None:
    """Called by the monitoring app when it is ready (None: figures are unavailable)."""
    _source["figures"] = source


def call_figures() -> CallFigures | None:
    return _source["figures"]
