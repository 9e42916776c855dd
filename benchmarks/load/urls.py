"""The site's URLs plus /load/guarded/: one guarded call to the local upstream per request.

/load/uncounted/guarded/ and /load/uncounted/api/dlq/stats/ are the same views at paths no
rate-limit group of run.py matches: the rate-limit cost is measured on one site, the same
workers answering requests that are counted and requests that are not.

/load/uncounted/bare/ makes the same upstream call with bare httpx (no pipeline), at a path no
group matches either: guarded / bare is the pipeline's cost at the HTTP level, on one site.
"""

import threading

import httpx

from django.conf import settings
from django.http import JsonResponse
from django.urls import path

from integrations.dlq.api import DeadLetterStatsView
from integrations.errors import ResilienceError
from integrations.http import Client
from resilience_site.urls import urlpatterns as site_urlpatterns

_client: Client | None = None
_bare: httpx.Client | None = None
_client_lock = threading.Lock()


def upstream_client() -> Client:
    """One Client per process, made on first use (after gunicorn forks): it keeps its connections
    alive between requests, as an application's module-level client would."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                _client = Client(settings.LOAD_INTEGRATION, base_url=settings.LOAD_UPSTREAM_URL)
    return _client


def bare_client() -> httpx.Client:
    """One bare httpx.Client per process, kept alive like upstream_client(), with the integration's
    attempt timeout (external_api preset: 5 s) as its own."""
    global _bare
    if _bare is None:
        with _client_lock:
            if _bare is None:
                _bare = httpx.Client(base_url=settings.LOAD_UPSTREAM_URL, timeout=5.0)
    return _bare


def bare(request):
    """The same upstream call as guarded(), with bare httpx: 200 with what it said, 503 if it failed."""
    try:
        response = bare_client().get("/item")
        response.raise_for_status()
    except httpx.HTTPError as error:
        return JsonResponse({"ok": False, "category": type(error).__name__}, status=503)
    return JsonResponse({"ok": True, "upstream": response.json()})


def guarded(request):
    """GET the upstream through the integration's pipeline; 200 with what it said, 503 if the call failed."""
    try:
        response = upstream_client().get("/item")
    except ResilienceError as error:
        return JsonResponse({"ok": False, "category": error.category.value}, status=503)
    return JsonResponse({"ok": True, "upstream": response.json()})


urlpatterns = [
    path("load/guarded/", guarded, name="load-guarded"),
    path("load/uncounted/guarded/", guarded),
    path("load/uncounted/bare/", bare),
    path("load/uncounted/api/dlq/stats/", DeadLetterStatsView.as_view()),
    *site_urlpatterns,
]
