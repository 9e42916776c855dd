"""Every endpoint of the HTTP API (docs/reference.md; docs/api.md), in the reference's order.

A project includes it under any prefix: ``path("api/", include("monitoring.api_urls"))``
(namespace ``resilience_api``). The integrations' views get their call
statistics from the figures source monitoring installs (integrations/figures.py).
Any other path under the prefix is a 404 in the API's error shape.
"""

from django.urls import include, path, re_path

from integrations import api as integrations_api

from . import api as monitoring_api
from . import api_views

app_name = "resilience_api"

urlpatterns = [
    path("health/", api_views.HealthView.as_view(), name="health"),
    path("integrations/", integrations_api.IntegrationListView.as_view(), name="integrations"),
    path("integrations/<str:name>/", integrations_api.IntegrationDetailView.as_view(),
         name="integration"),
    re_path(r"^integrations/(?P<name>[^/]+)/breaker/(?P<action>reset|open|close)/$",
            integrations_api.BreakerActionView.as_view(), name="breaker-action"),
    path("quotas/", integrations_api.QuotaListView.as_view(), name="quotas"),
    path("cache/stats/", integrations_api.CacheStatsView.as_view(), name="cache-stats"),
    path("cache/<str:name>/", integrations_api.CacheClearView.as_view(), name="cache-clear"),
    path("dlq/", include("integrations.dlq.urls")),
    path("alerts/", monitoring_api.AlertListView.as_view(), name="alerts"),
    path("alerts/<int:id>/acknowledge/", monitoring_api.AlertAcknowledgeView.as_view(), name="alert-acknowledge"),
    path("alerts/<int:id>/resolve/", monitoring_api.AlertResolveView.as_view(), name="alert-resolve"),
    path("watchdog/report/", monitoring_api.WatchdogReportView.as_view(), name="watchdog-report"),
    path("watchdog/run/", monitoring_api.WatchdogRunView.as_view(), name="watchdog-run"),
    path("metrics/summary/", monitoring_api.MetricsSummaryView.as_view(), name="metrics-summary"),
    path("schema/", api_views.SchemaView.as_view(), name="schema"),
    path("docs/", api_views.SwaggerView.as_view(url_name="resilience_api:schema"), name="docs"),
    re_path(r"^(?P<path>.*)$", api_views.unknown_endpoint),
]
