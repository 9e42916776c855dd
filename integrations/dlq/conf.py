"""The dead letter queue's settings, their defaults and validation (integrations/conf.py explains the pattern)."""

from __future__ import annotations

from ..conf import AppSettings, Setting, boolean, integer, list_of_strings, string


class DlqSettings(AppSettings):
    def _validated(self, attr):
        value = super()._validated(attr)
        if attr == "BACKOFF_MAX_MS" and self.BACKOFF_BASE_MS > value:
            from django.core.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(
                f"RESILIENCE_DLQ_BACKOFF_BASE_MS ({self.BACKOFF_BASE_MS}) must not exceed "
                f"RESILIENCE_DLQ_BACKOFF_MAX_MS ({value}).")
        return value


dlq_settings = DlqSettings("dlq", {
    "MAX_REDRIVES": Setting(10, integer(1), "Redrives of an entry before it is dead, unless it asks otherwise."),
    "BACKOFF_BASE_MS": Setting(60_000, integer(1), "The wait before the first redrive; it doubles after each."),
    "BACKOFF_MAX_MS": Setting(6 * 3_600_000, integer(1), "The longest wait between redrives (at least the base)."),
    "LEASE_S": Setting(300, integer(1), "How long a worker holds the entries it claimed."),
    "RATE_PER_MINUTE": Setting(600, integer(0), "Entries redriven per integration per minute; 0: no cap."),
    "BATCH_SIZE": Setting(100, integer(1), "Entries claimed at once by a redrive."),
    "ASYNC_COMMIT": Setting(True, boolean, "On PostgreSQL, a redrive's writes do not wait for the WAL flush "
                                           "(synchronous_commit off for the run)."),
    "REDRIVE_EVERY_MIN": Setting(5, integer(1), "How often the scheduled redrive runs."),
    "HANDLER_MODULES": Setting([], list_of_strings, "Modules that register dead letter handlers."),
    "SPOOL_DIR": Setting("", string(), "Where a dead letter the database refused waits on disk; empty: logged only."),
}, prefix="RESILIENCE_DLQ_")
