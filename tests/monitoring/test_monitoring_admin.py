"""The monitoring admin pages render, and the alert actions go through the model's methods."""

from datetime import datetime, timezone

import pytest
from django.urls import reverse

from integrations.models import Integration
from monitoring.models import (
    CRITICAL,
    WARNING,
    Alert,
    CallStats,
    Delivery,
    HealthCheck,
    HealthCheckResult,
    NotificationChannel,
)

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 1, 5, 12, 30, tzinfo=timezone.utc)


@pytest.fixture
def billing():
    return Integration.objects.create(name="billing")


def test_every_monitoring_page_lists_its_rows(admin_client, billing):
    CallStats.objects.create(integration=billing, minute=NOW, calls=3, successes=2, failures_timeout=1,
                             latency_le_100=3)
    alert, _ = Alert.raise_or_update(Alert.QUOTA, WARNING, "85% of the hourly quota used", integration=billing)
    check = HealthCheck.objects.create(integration=billing, url="http://127.0.0.1:1/health")
    HealthCheckResult.objects.create(health_check=check, at=NOW, ok=False, latency_ms=3, error="refused")
    channel = NotificationChannel.objects.create(name="ops", kind=NotificationChannel.EMAIL, emails="a@example.com")
    Delivery.objects.create(channel=channel, alert=alert, event="new", subject="s", body="{}")
    for model, text in ((CallStats, "billing"), (Alert, "85% of the hourly quota used"),
                        (HealthCheck, "http://127.0.0.1:1/health"), (HealthCheckResult, "refused"),
                        (NotificationChannel, "notify.ops"), (Delivery, "ops")):
        url = reverse(f"admin:monitoring_{model._meta.model_name}_changelist")
        response = admin_client.get(url)
        assert response.status_code == 200, url
        assert text in response.content.decode(), model


def test_the_acknowledge_and_resolve_actions_use_the_alerts_methods(admin_client, admin_user, billing):
    warning, _ = Alert.raise_or_update(Alert.QUOTA, WARNING, "85%", integration=billing)
    critical, _ = Alert.raise_or_update(Alert.UNAVAILABLE, CRITICAL, "down", integration=billing)
    url = reverse("admin:monitoring_alert_changelist")
    admin_client.post(url, {"action": "acknowledge", "_selected_action": [warning.pk]})
    admin_client.post(url, {"action": "resolve", "_selected_action": [critical.pk]})
    warning.refresh_from_db()
    critical.refresh_from_db()
    assert (warning.status, warning.acknowledged_by) == (Alert.ACKNOWLEDGED, admin_user)
    assert (critical.status, critical.resolution) == (Alert.RESOLVED, "resolved by an operator (by admin)")
