from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("admin/", admin.site.urls),
    # django_prometheus serves the Prometheus exposition at /metrics.
    path("", include("django_prometheus.urls")),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
