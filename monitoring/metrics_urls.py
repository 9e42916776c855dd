"""The Prometheus exposition, for a project to include under the path it scrapes:

    path("metrics", include("monitoring.metrics_urls")),

Behind RESILIENCE_METRICS_TOKEN when it is set (monitoring/metrics_view.py).
"""

from django.urls import path

from . import metrics_view

app_name = "resilience_metrics"

urlpatterns = [
    path("", metrics_view.metrics, name="metrics"),
]
