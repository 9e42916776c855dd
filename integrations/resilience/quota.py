"""Quota: hourly and daily call limits over fixed UTC windows.

Every attempt that reaches the upstream consumes one unit of each window;
at the limit, calls are refused with QUOTA_EXCEEDED before the upstream.
Usage level: healthy < 80 % <= warning < 95 % <= critical.
"""

from __future__ import annotations

from dataclasses import dataclass

from .policy import Policy

HOUR = 3600
DAY = 86400

HEALTHY = "healthy"
WARNING = "warning"
CRITICAL = "critical"
WARNING_RATIO = 0.80
CRITICAL_RATIO = 0.95


def level_for(ratio: float | None) -> str:
    if ratio is None or ratio < WARNING_RATIO:
        return HEALTHY
    return WARNING if ratio < CRITICAL_RATIO else CRITICAL


def window_start(now: float, length: int) -> int:
    return int(now // length) * length


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    integration: str
    hourly_used: int
    hourly_limit: int | None
    daily_used: int
    daily_limit: int | None
    hour_resets_at: int
    day_resets_at: int

    @property
    def hourly_ratio(self) -> float | None:
        return self.hourly_used / self.hourly_limit if self.hourly_limit else None

    @property
    def daily_ratio(self) -> float | None:
        return self.daily_used / self.daily_limit if self.daily_limit else None

    @property
    def level(self) -> str:
        ratios = [r for r in (self.hourly_ratio, self.daily_ratio) if r is not None]
        return level_for(max(ratios) if ratios else None)

    def as_dict(self) -> dict:
        return {
            "integration": self.integration,
            "hourly": {"used": self.hourly_used, "limit": self.hourly_limit, "ratio": self.hourly_ratio,
                       "resets_at": self.hour_resets_at},
            "daily": {"used": self.daily_used, "limit": self.daily_limit, "ratio": self.daily_ratio,
                      "resets_at": self.day_resets_at},
            "level": self.level,
        }


class QuotaCell:
    """Per-process counters of one integration's two windows (not locked itself)."""

    __slots__ = ("hour", "hour_used", "day", "day_used", "_rolls_at")

    def __init__(self) -> None:
        self.hour = self.day = -1
        self.hour_used = self.day_used = 0
        self._rolls_at = float("-inf")  # the next hour boundary: nothing to recompute before it

    def _roll(self, now: float) -> None:
        if self._rolls_at > now >= self.hour:
            return
        self._rolls_at = window_start(now, HOUR) + HOUR
        hour = window_start(now, HOUR)
        if hour != self.hour:
            self.hour, self.hour_used = hour, 0
        day = window_start(now, DAY)
        if day != self.day:
            self.day, self.day_used = day, 0

    def consume(self, policy: Policy, now: float) -> str | None:
        """Take one unit; returns None, or the name of the exhausted window."""
        hourly, daily = policy.hourly_limit, policy.daily_limit
        if hourly is None and daily is None:
            return None
        self._roll(now)
        if hourly is not None and self.hour_used >= hourly:
            return "hourly"
        if daily is not None and self.day_used >= daily:
            return "daily"
        self.hour_used += 1
        self.day_used += 1
        return None

    def usage(self, policy: Policy, now: float) -> QuotaUsage:
        self._roll(now)
        return QuotaUsage(integration=policy.name,
                          hourly_used=self.hour_used, hourly_limit=policy.hourly_limit, hour_resets_at=self.hour + HOUR,
                          daily_used=self.day_used, daily_limit=policy.daily_limit, day_resets_at=self.day + DAY)
