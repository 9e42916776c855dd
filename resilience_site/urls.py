from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from monitoring import health_page, metrics_view
from resilience_site import api_views

urlpatterns = [
    # The admin's System health page (staff; before the admin's own catch-all).
    path("admin/system-health/", admin.site.admin_view(health_page.system_health_view), name="system_health"),
    path("admin/", admin.site.urls),
    # The HTTP API (docs/api.md), the dead letter queue's endpoints included.
    path("api/", include("resilience_site.api_urls")),
    # The Prometheus exposition, behind RESILIENCE_METRICS_TOKEN when it is set.
    path("metrics", metrics_view.metrics, name="metrics"),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]

# Django's own errors: in the API's JSON shape under /api/, Django's pages elsewhere.
handler400 = api_views.bad_request
handler403 = api_views.permission_denied
handler404 = api_views.page_not_found
handler500 = api_views.server_error
