"""The monitoring app's django-q tasks (schedules declared in MonitoringConfig.ready)."""

from __future__ import annotations

import logging

from . import stats, watchdog
from .models import HealthCheck

logger = logging.getLogger("monitoring.tasks")


def run_watchdog() -> dict:
    """One watchdog run; the report is the task's result."""
    report = watchdog.run()
    logger.info("watchdog: %s (%d critical, %d warnings)", report["status"], len(report["critical"]),
                len(report["warnings"]))
    return report


def run_due_health_checks() -> dict[str, str]:
    """Run every health check whose interval has passed; a check another worker claimed is skipped."""
    results = {}
    for check in HealthCheck.objects.due():
        if check.claim():
            check.run()
            results[check.integration.name] = check.status
    return results


def prune() -> dict[str, int]:
    deleted = stats.prune()
    logger.info("pruned %(call_stats)d call statistics rows and %(health_check_results)d health check results",
                deleted)
    return deleted
