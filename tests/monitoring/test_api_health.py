"""GET /api/health/, and what the whole API shares: Django's own errors in JSON under /api/, OPTIONS."""

import json
import os
import subprocess
import sys

import pytest
from django.db import OperationalError
from django.test import Client
from rest_framework.test import APIClient

from api_support import client_for, error_of
from integrations.models import Integration
from integrations.resilience import execute, get_engine
from integrations.resilience.redis_store import RedisStore
from monitoring.models import CRITICAL, WARNING, Alert
from monitoring import api_views

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_rate_limits(settings):
    settings.RESILIENCE_RATE_LIMITS = {}


def health(client=None):
    response = (client or APIClient()).get("/api/health/")
    assert response["Cache-Control"] == "no-store"
    return response.status_code, response.json()


def test_a_healthy_site_is_ok_and_anyone_may_ask():
    Integration.objects.create(name="billing")
    status, body = health()
    assert (status, body["status"]) == (200, "ok")
    checks = body["checks"]
    assert checks["database"] == {"status": "ok"}
    assert checks["breakers"] == {"status": "ok", "total": 1, "open": 0, "half_open": 0,
                                  "scope": checks["breakers"]["scope"]}
    assert checks["alerts"] == {"status": "ok", "warning": 0, "critical": 0}
    assert checks["shared_state"]["status"] == "ok"


def test_a_bad_token_does_not_turn_the_probe_into_a_401():
    assert health(APIClient(HTTP_AUTHORIZATION="Token stale"))[0] == 200


def test_an_open_breaker_degrades_but_never_takes_the_site_down():
    Integration.objects.create(name="billing", failure_threshold=1, max_retries=0, timeout_enforcement="inline")
    Integration.objects.create(name="ledger").force_open()
    Integration.objects.create(name="prices")

    def fail():
        raise ConnectionError("down")

    execute("billing", fail)
    status, body = health()
    assert (status, body["status"]) == (200, "degraded")
    assert body["checks"]["breakers"]["status"] == "degraded"
    assert (body["checks"]["breakers"]["open"], body["checks"]["breakers"]["total"]) == (2, 3)
    assert "billing" not in str(body)  # public: counts, never names


def test_an_active_critical_alert_degrades_and_a_warning_does_not():
    Alert.raise_or_update(Alert.DLQ_BACKLOG, WARNING, "backlog")
    assert health()[1]["status"] == "ok"
    Alert.raise_or_update(Alert.UNAVAILABLE, CRITICAL, "billing is down")
    status, body = health()
    assert (status, body["status"], body["checks"]["alerts"]["critical"]) == (200, "degraded", 1)


def test_an_unreachable_database_is_down_with_503(monkeypatch):
    class Unreachable:
        def cursor(self):
            raise OperationalError("connection refused")

    monkeypatch.setattr(api_views, "connection", Unreachable())
    status, body = health()
    assert (status, body["status"]) == (503, "down")
    assert body["checks"]["database"] == {"status": "down", "error": "OperationalError"}
    assert body["checks"]["breakers"] == {"status": "unknown"} and body["checks"]["alerts"] == {"status": "unknown"}


def test_unreachable_shared_state_degrades(monkeypatch):
    # nothing listens on port 1
    monkeypatch.setattr(get_engine(), "store", RedisStore("redis://127.0.0.1:1/0", prefix="test-unreachable"))
    status, body = health()
    assert (status, body["status"]) == (200, "degraded")
    assert body["checks"]["shared_state"] == {"status": "degraded", "configured": True, "available": False}


# -- Django's errors under /api/ -----------------------------------------------------------------

@pytest.mark.parametrize("method", ["get", "post", "delete"])
def test_an_unknown_api_path_is_a_json_404_whatever_the_method(method):
    error = error_of(getattr(client_for("viewer"), method)("/api/nothing/here/"), 404)
    assert (error["code"], error["message"]) == ("not_found", "No endpoint at /api/nothing/here/.")


def test_a_missing_trailing_slash_is_a_404_that_says_so():
    error = error_of(client_for("viewer").get("/api/integrations"), 404)
    assert error["message"] == "No endpoint at /api/integrations. Did you mean /api/integrations/ ?"


def test_unknown_paths_are_json_even_with_debug_on(settings):
    settings.DEBUG = True
    assert error_of(Client().get("/api/nope/"), 404)["code"] == "not_found"


def test_djangos_error_handlers_answer_json_under_api_and_html_elsewhere(rf):
    for handler, status in ((api_views.bad_request, 400), (api_views.permission_denied, 403),
                            (api_views.page_not_found, 404)):
        api = handler(rf.get("/api/anything/"), Exception("boom"))
        assert (api.status_code, api["Content-Type"]) == (status, "application/json")
        assert set(json.loads(api.content)["error"]) == {"code", "message"}
        page = handler(rf.get("/admin/anything/"), Exception("boom"))
        assert page.status_code == status and page["Content-Type"].startswith("text/html")
    assert api_views.server_error(rf.get("/api/x/")).status_code == 500
    assert api_views.server_error(rf.get("/x/"))["Content-Type"].startswith("text/html")


def test_an_uncaught_exception_in_an_api_view_is_a_json_500(monkeypatch):
    from integrations import api

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api.IntegrationListView, "get", broken)
    client = client_for("viewer")
    client.raise_request_exception = False
    error = error_of(client.get("/api/integrations/"), 500)
    assert error == {"code": "server_error", "message": "The server failed to answer; the error is logged."}


@pytest.mark.parametrize("url", ["/api/integrations/billing/breaker/reset/", "/api/cache/billing/",
                                 "/api/alerts/1/resolve/", "/api/watchdog/run/", "/api/integrations/",
                                 "/api/dlq/retry/", "/api/health/"])
def test_options_describes_an_endpoint_without_failing(url):
    client = client_for("operator", perms=("change_integration", "change_alert", "change_deadletter"))
    response = client.options(url)
    assert response.status_code == 200
    assert {"name", "renders", "parses"} <= set(response.json())


def test_the_api_defaults_import_when_their_module_is_imported_first():
    # REST_FRAMEWORK's pagination and metadata classes live in integrations.api_common, which DRF's views
    # import as they are defined: a process (a django-q worker) may import api_common before any view
    code = "import django; django.setup(); import integrations.api_common; import rest_framework.generics"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DJANGO_SETTINGS_MODULE": "resilience_site.settings"})
    assert result.returncode == 0, result.stderr[-2000:]
