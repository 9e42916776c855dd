"""One name per choice set that several fields of the API share, for drf-spectacular's ENUM_NAME_OVERRIDES.

The API's schema view uses them (monitoring/api_views.py, SCHEMA_SETTINGS). drf-spectacular's own
``check --deploy`` generates the project's schema with the project's SPECTACULAR_SETTINGS: a project
that wants that check free of enum-naming warnings sets

    SPECTACULAR_SETTINGS = {"ENUM_NAME_OVERRIDES": ENUM_NAME_OVERRIDES}   # from monitoring.schema_names

(plain strings: importable from settings.py, before the apps are loaded).
"""

ENUM_NAME_OVERRIDES = {
    "IntegrationKindEnum": "integrations.resilience.policy.KINDS",
    "BreakerStateEnum": "integrations.resilience.breaker.STATES",
    "BreakerModeEnum": "integrations.models.Integration.MODE_CHOICES",
    "StateScopeEnum": "integrations.api.STATE_SCOPES",
    "CacheClearScopeEnum": "integrations.api.CLEAR_SCOPES",
    "LevelEnum": "integrations.api.LEVELS",  # quota levels and the watchdog's status: healthy, warning, critical
    "AlertKindEnum": "monitoring.models.Alert.KIND_CHOICES",
    "AlertStatusEnum": "monitoring.models.Alert.STATUS_CHOICES",
    "DeadLetterStatusEnum": "integrations.dlq.models.STATUSES",
    "HealthStatusEnum": "monitoring.api_views.HEALTH_STATUS_CHOICES",
    "CheckStatusEnum": "monitoring.api_views.CHECK_STATUS_CHOICES",
}
