"""System checks (``manage.py check``) on the integrations' timeouts."""

from django.core.checks import Warning
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError


def check_integration_timeouts(app_configs=None, **kwargs):
    """Warn when an integration's timeouts cannot hold together.

    W001: attempts x attempt timeout + backoff delays exceed the overall
    timeout, so the last retries can never run in full.
    W002: the overall timeout exceeds RESILIENCE_REQUEST_DEADLINE_MS, so a
    request can wait on the integration longer than the site allows.
    """
    from .models import Integration

    try:
        integrations = list(Integration.objects.all())
    except DatabaseError:
        return []  # not migrated yet (check runs before migrate): nothing to check
    from .conf import app_settings

    try:
        deadline_ms = app_settings.REQUEST_DEADLINE_MS
    except ImproperlyConfigured:
        return []  # the settings check reports it
    warnings = []
    for integration in integrations:
        policy = integration.to_policy()
        worst = policy.worst_case_ms()
        if worst > policy.timeout_ms:
            warnings.append(Warning(
                f"Integration {policy.name!r}: its worst case ({policy.attempts} attempts x "
                f"{policy.attempt_timeout_ms} ms + backoff = {worst:.0f} ms) exceeds its overall timeout "
                f"({policy.timeout_ms} ms).",
                hint="Lower max_retries or attempt_timeout_ms, or raise timeout_ms.",
                obj=integration, id="integrations.W001",
            ))
        if policy.timeout_ms > deadline_ms:
            warnings.append(Warning(
                f"Integration {policy.name!r}: its overall timeout ({policy.timeout_ms} ms) exceeds "
                f"RESILIENCE_REQUEST_DEADLINE_MS ({deadline_ms} ms).",
                hint="Lower timeout_ms, or raise RESILIENCE_REQUEST_DEADLINE_MS if requests may wait that long.",
                obj=integration, id="integrations.W002",
            ))
    return warnings


def check_task_broker(app_configs=None, **kwargs):
    """W003: no Q_CLUSTER, so django-q2 would look for Redis on localhost for the scheduled
    redrive, watchdog and health checks. The embedded choice is its ORM broker."""
    from django.conf import settings

    if hasattr(settings, "Q_CLUSTER"):
        return []
    return [Warning(
        "Q_CLUSTER is not set: django-q2, which runs the dead letter redrive, the watchdog and the "
        "health checks, then uses a Redis broker on localhost.",
        hint='Set Q_CLUSTER = {"name": "myproject", "orm": "default", "timeout": 120, "retry": 180} to queue '
             'tasks in the database, or {"redis": ...} for Redis (README, "Add it to your Django project").',
        id="integrations.W003",
    )]
