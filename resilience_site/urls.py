from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from monitoring import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/dlq/", include("integrations.dlq.urls")),
    # The Prometheus exposition, behind RESILIENCE_METRICS_TOKEN when it is set.
    path("metrics", metrics_view.metrics, name="metrics"),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
