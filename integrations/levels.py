"""How operators read a success rate and a p95 latency: healthy, warning or critical.

One rule for every page that colours them (the Integration admin, the System health page).
"""

from __future__ import annotations

from .resilience.quota import CRITICAL, HEALTHY, WARNING

# Success rate (successes over calls, refusals included) from which a rate is a warning, then critical.
SUCCESS_WARNING_BELOW = 0.95
SUCCESS_CRITICAL_BELOW = 0.80
# p95 latency as a share of the integration's slow_call_ms from which it is a warning (above 1: critical).
LATENCY_WARNING_FROM = 0.8


def ratio(part: int, whole: int) -> float | None:
    """``part / whole``, None when there is nothing to divide (no calls, no cacheable calls)."""
    return part / whole if whole else None


def success_level(rate: float | None) -> str | None:
    if rate is None:
        return None
    return HEALTHY if rate >= SUCCESS_WARNING_BELOW else WARNING if rate >= SUCCESS_CRITICAL_BELOW else CRITICAL


def latency_level(p95_ms: float | None, slow_call_ms: int) -> str | None:
    if p95_ms is None:
        return None
    return HEALTHY if p95_ms < LATENCY_WARNING_FROM * slow_call_ms else WARNING if p95_ms <= slow_call_ms else CRITICAL
