"""The site's URLs plus /probe/<integration>/<ok|fail>: one guarded call per request."""

import os
import time

from django.http import JsonResponse
from django.urls import path

from integrations.resilience import execute
from resilience_site.urls import urlpatterns as site_urlpatterns

# Long enough that concurrent requests find this worker busy and go to another one.
UPSTREAM_SECONDS = 0.05


def probe(request, integration, outcome):
    """Make one guarded call that succeeds or fails as asked; answer which worker made it."""

    def upstream():
        time.sleep(UPSTREAM_SECONDS)
        if outcome == "fail":
            raise ConnectionError("the probe's upstream refused the connection")
        return "pong"

    result = execute(integration, upstream)
    return JsonResponse({"pid": os.getpid(), "ok": result.ok, "attempts": result.attempts})


urlpatterns = [
    path("probe/<str:integration>/<str:outcome>", probe),
    *site_urlpatterns,
]
