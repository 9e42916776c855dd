"""Our site's URLs: the admin (with the System health page), the HTTP API and the metrics, mounted
as any project mounts them (README, "Add it to your Django project")."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("admin/", admin.site.urls),
    # The HTTP API (docs/api.md), the dead letter queue's endpoints included.
    path("api/", include("monitoring.api_urls")),
    # The Prometheus exposition, behind RESILIENCE_METRICS_TOKEN when it is set.
    path("metrics", include("monitoring.metrics_urls")),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]

# Django's own errors: in the API's JSON shape under RESILIENCE_API_PREFIX, Django's pages elsewhere.
handler400 = "monitoring.api_views.bad_request"
handler403 = "monitoring.api_views.permission_denied"
handler404 = "monitoring.api_views.page_not_found"
handler500 = "monitoring.api_views.server_error"
