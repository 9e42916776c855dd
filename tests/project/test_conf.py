"""The apps' settings: defaults inside the apps, validation by manage.py check, setting_changed honoured."""

import re
from pathlib import Path

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from integrations.conf import app_settings
from integrations.dlq.conf import dlq_settings
from monitoring.conf import WATCHDOG_DEFAULTS, metrics_settings, monitoring_settings

ALL = (app_settings, dlq_settings, monitoring_settings, metrics_settings)
pytestmark = pytest.mark.django_db  # check also runs the integrations' timeout checks

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def errors_naming(setting):
    return [message for message in checks.run_checks() if setting in message.msg and message.level >= checks.ERROR]


@pytest.mark.parametrize("setting, value, wanted", [
    ("RESILIENCE_STATS_FLUSH_S", -1, "must be at least 0"),
    ("RESILIENCE_STATS_RETENTION_DAYS", "7", "must be a whole number"),
    ("RESILIENCE_DLQ_BATCH_SIZE", 0, "must be at least 1"),
    ("RESILIENCE_DLQ_HANDLER_MODULES", "shop.dead_letters", "must be a list of strings"),
    ("RESILIENCE_CACHE_ALIAS", "nowhere", "not in CACHES"),
    ("RESILIENCE_REDIS_URL", "localhost:6379", "must start with redis://"),
    ("RESILIENCE_REDIS_URL", "redis+sentinel://10.0.0.1:26379", "names no service"),
    ("RESILIENCE_REDIS", {"sentinels": ["10.0.0.1:26379"]}, "['service_name'] is required"),
    ("RESILIENCE_REDIS", {"cluster_nodes": ["10.0.0.1"]}, "not host:port"),
    ("RESILIENCE_REDIS_SOCKET_TIMEOUT_S", 0, "must be a number of seconds above 0"),
    ("RESILIENCE_AUTO_REGISTER", "yes", "must be True or False"),
    ("RESILIENCE_ADMIN_ALLOWED_IPS", "10.0.0.0/8", "must be a list of CIDRs"),
    ("RESILIENCE_TRUSTED_PROXIES", ["10.0.0.300/8"], "must be a list of CIDRs"),
    ("RESILIENCE_RATE_LIMITS", {"api": {"paths": ["/api/"], "limit": 0, "window_s": 1}}, "['limit']"),
    ("RESILIENCE_CONTENT_SECURITY_POLICY", "default-src 'self'\nX: y", "must be one line"),
    ("RESILIENCE_REQUEST_BUDGETS", {"api/": 5000}, "the key 'api/' must be a path prefix"),
    ("RESILIENCE_REQUEST_BUDGETS", {"/api/": 0}, "the budget of '/api/' must be a whole number of milliseconds"),
    ("RESILIENCE_REQUEST_BUDGETS", ["/api/"], "must be a dict of path prefix -> milliseconds"),
    ("RESILIENCE_WATCHDOG", {"min_callz": 5}, "is not a threshold"),
    ("RESILIENCE_WATCHDOG", {"min_calls": 0}, "['min_calls'] must be a whole number, at least 1"),
    ("RESILIENCE_METRICS_TOKEN", 123, "must be a string"),
    ("PROMETHEUS_MULTIPROC_DIR", "/no/such/directory", "not a directory"),
])
def test_a_bad_value_fails_check_with_an_error_naming_the_setting(settings, setting, value, wanted):
    setattr(settings, setting, value)
    (error,) = errors_naming(setting)
    assert error.msg.startswith(setting) and wanted in error.msg, error.msg
    assert re.fullmatch(r"(integrations|dlq|monitoring)\.E[12]\d\d", error.id)


def test_a_backoff_base_above_its_maximum_names_both(settings):
    settings.RESILIENCE_DLQ_BACKOFF_BASE_MS = 10_000
    settings.RESILIENCE_DLQ_BACKOFF_MAX_MS = 1_000
    (error,) = errors_naming("RESILIENCE_DLQ_BACKOFF_MAX_MS")
    assert "RESILIENCE_DLQ_BACKOFF_BASE_MS (10000) must not exceed" in error.msg


def test_a_bad_value_used_anyway_raises_improperly_configured_naming_it(settings):
    settings.RESILIENCE_DLQ_LEASE_S = "long"
    with pytest.raises(ImproperlyConfigured, match="RESILIENCE_DLQ_LEASE_S must be a whole number"):
        dlq_settings.LEASE_S


def test_the_defaults_hold_when_the_host_sets_nothing(settings):
    for name in ("RESILIENCE_STATS_FLUSH_S", "RESILIENCE_WATCHDOG", "RESILIENCE_DLQ_SPOOL_DIR",
                 "RESILIENCE_REDIS_URL", "RESILIENCE_RATE_LIMITS"):
        if hasattr(settings, name):
            delattr(settings, name)
    assert monitoring_settings.STATS_FLUSH_S == 10
    assert monitoring_settings.WATCHDOG == WATCHDOG_DEFAULTS
    assert dlq_settings.SPOOL_DIR == ""
    assert app_settings.REDIS_URL == ""  # per-process state
    assert [group.name for group in app_settings.RATE_LIMITS] == ["api_read", "api_write", "admin_login"]
    assert not [message for message in checks.run_checks() if message.level >= checks.ERROR]


def test_a_changed_setting_is_read_again(settings):
    settings.RESILIENCE_WATCHDOG = {"min_calls": 50}
    assert monitoring_settings.WATCHDOG["min_calls"] == 50
    assert monitoring_settings.WATCHDOG["window_minutes"] == WATCHDOG_DEFAULTS["window_minutes"]
    settings.RESILIENCE_WATCHDOG = {"min_calls": 7}
    assert monitoring_settings.WATCHDOG["min_calls"] == 7


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="NO_SUCH"):
        app_settings.NO_SUCH  # noqa: B018


def test_every_setting_is_in_the_reference():
    text = REFERENCE.read_text()
    missing = [conf.setting_name(attr) for conf in ALL for attr in conf.specs
               if f"`{conf.setting_name(attr)}`" not in text]
    assert missing == []
