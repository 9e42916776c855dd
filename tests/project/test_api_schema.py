"""The OpenAPI schema (/api/schema/), Swagger UI (/api/docs/), and schemathesis over every operation."""

import pytest
import schemathesis
from django.contrib.auth.models import Permission, User
from django.core.handlers.wsgi import WSGIHandler
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from schemathesis.checks import not_a_server_error
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from api_support import client_for, error_of
from dlq_support import enqueue
from browser_support import PASSWORD, log_in
from integrations.models import Integration
from monitoring.models import CRITICAL, WARNING, Alert, CallStats

pytestmark = pytest.mark.django_db

# Every operation of docs/reference.md's HTTP API (but /metrics, which is not under /api/).
CONTRACT_OPERATIONS = {
    ("get", "/api/health/"), ("get", "/api/integrations/"), ("get", "/api/integrations/{name}/"),
    ("post", "/api/integrations/{name}/breaker/{action}/"), ("get", "/api/quotas/"), ("get", "/api/cache/stats/"),
    ("delete", "/api/cache/{name}/"), ("get", "/api/dlq/stats/"), ("get", "/api/dlq/"), ("post", "/api/dlq/retry/"),
    ("delete", "/api/dlq/"), ("get", "/api/alerts/"), ("post", "/api/alerts/{id}/acknowledge/"),
    ("post", "/api/alerts/{id}/resolve/"), ("get", "/api/watchdog/report/"), ("post", "/api/watchdog/run/"),
    ("get", "/api/metrics/summary/"),
}
TOKEN = "schemathesis0operator0token0000000000000"  # 40 characters, like every DRF token


@pytest.fixture(autouse=True)
def no_rate_limits(settings):
    settings.RESILIENCE_RATE_LIMITS = {}


def operations(document):
    return {(method, path) for path, item in document["paths"].items() for method in item}


def test_the_schema_is_openapi_3_with_exactly_the_contracts_operations():
    response = client_for("viewer").get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert operations(document) == CONTRACT_OPERATIONS


def test_the_schema_needs_a_staff_user_like_every_read():
    assert error_of(APIClient().get("/api/schema/"), 401)["code"] == "not_authenticated"
    assert error_of(client_for("member", staff=False).get("/api/schema/"), 403)["code"] == "permission_denied"


@pytest.fixture
def document():
    return client_for("viewer").get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()


def test_the_schema_documents_parameters_bodies_and_the_error_shape(document):
    paths = document["paths"]
    parameters = {p["name"]: p for p in paths["/api/integrations/"]["get"]["parameters"]}
    assert set(parameters) == {"kind", "mode", "state", "page", "page_size", "limit"}
    assert parameters["page_size"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000}
    assert parameters["limit"]["schema"] == parameters["page_size"]["schema"]
    assert parameters["state"]["schema"]["enum"] == ["closed", "open", "half_open"]
    summary = {p["name"]: p for p in paths["/api/metrics/summary/"]["get"]["parameters"]}
    assert summary["minutes"]["schema"]["minimum"] == 1
    listing = paths["/api/integrations/"]["get"]["responses"]
    assert listing["200"]["content"]["application/json"]["schema"]["$ref"] == (
        "#/components/schemas/PaginatedIntegrationList")
    for status in ("400", "401", "403", "404", "429"):
        assert listing[status]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Error"
    assert set(document["components"]["schemas"]["ErrorDetail"]["properties"]) == {
        "code", "message", "fields", "retry_after"}
    resolve = paths["/api/alerts/{id}/resolve/"]["post"]
    assert "409" in resolve["responses"]
    assert resolve["requestBody"]["content"]["application/json"]["schema"]["$ref"] == (
        "#/components/schemas/ResolveRequestRequest")
    retry = paths["/api/dlq/retry/"]["post"]
    assert "202" in retry["responses"] and "requestBody" in retry


def test_only_the_health_check_is_public(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            public = "security" not in operation or {} in operation["security"]
            assert public == (path == "/api/health/"), (method, path)
    health = document["paths"]["/api/health/"]["get"]["responses"]
    assert set(health) == {"200", "503"}


def test_swagger_ui_is_served_from_this_origin_without_inline_scripts():
    client = client_for("viewer")
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    assert "<script>" not in html and "https://" not in html  # the CSP allows this origin's scripts only
    assert "default-src 'self'" in page["Content-Security-Policy"]
    script = client.get("/api/docs/?script=")
    assert script.status_code == 200 and script["Content-Type"].startswith("application/javascript")
    assert "/api/schema/" in script.content.decode()


@pytest.mark.slow
def test_swagger_ui_works_in_chromium_under_the_sites_content_security_policy(browser, live_server,
                                                                                 django_user_model):
    """Every operation listed, and "Try it out" calls the API: no script from elsewhere, none inline.

    The policy still blocks two cosmetic things of Swagger UI: the page's inline <style> block and
    its data: SVG icons; the site's policy is not widened for them.
    """
    django_user_model.objects.create_superuser("operator", "operator@example.com", PASSWORD)
    Integration.objects.create(name="billing")
    log_in(browser, live_server.url, "/api/docs/")
    wait = WebDriverWait(browser, 15)
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".opblock")) == len(CONTRACT_OPERATIONS))
    listing = browser.find_element(By.ID, "operations-integrations-integrations_list")
    listing.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda driver: listing.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
    listing.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait.until(lambda driver: listing.find_element(
        By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"))
    assert status.text.strip() == "200"
    assert '"name": "billing"' in listing.find_element(By.CSS_SELECTOR, ".live-responses-table .microlight").text
    blocked = [entry["message"] for entry in browser.get_log("browser") if entry["source"] == "security"]
    assert blocked and all("inline style" in message or "'data:image/svg+xml" in message for message in blocked)


# -- schemathesis: every operation, generated inputs, zero server errors ------------------------------

@pytest.fixture
def api_schema():
    """The schema as an acting staff user sees it, with objects for the operations to act on.

    The operator holds every permission the API checks; the examples in the schema name the
    integration "billing" and alert 1, which exist here (sequences are reset per test).
    """
    operator = User.objects.create_user("operator", is_staff=True)
    operator.user_permissions.add(*Permission.objects.filter(codename__in=(
        "change_integration", "change_alert", "change_deadletter", "delete_deadletter")))
    Token.objects.create(user=operator, key=TOKEN)
    billing = Integration.objects.create(name="billing", hourly_limit=100, cache_ttl_s=60)
    Integration.objects.create(name="ledger", kind="database")
    now = timezone.now()
    Alert.raise_or_update(Alert.ERROR_SPIKE, CRITICAL, "errors", integration=billing, now=now)
    Alert.raise_or_update(Alert.DLQ_BACKLOG, WARNING, "backlog", now=now)
    CallStats.objects.create(integration=billing, minute=now.replace(second=0, microsecond=0), calls=10,
                             successes=9, failures_timeout=1, attempts=10, latency_le_100=10, latency_sum_ms=600.0)
    enqueue(payload={"order": 1}, integration="billing")
    # a handler built now reads the settings of this test (rate limits off)
    return schemathesis.openapi.from_wsgi("/api/schema/", WSGIHandler(), headers={"Authorization": f"Token {TOKEN}"})


AUTHORIZATION = {"Authorization": f"Token {TOKEN}"}
EXAMPLES_PER_MODE = 12  # per operation, once with valid inputs and once with invalid ones


def server_errors_of(operation, strategy, max_examples: int, calls: list) -> list[str]:
    """Run one operation on at most ``max_examples`` generated cases (seeded): the server errors found, shrunk."""

    @given(case=strategy)
    @hypothesis_settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))
    def run(case):
        calls.append(operation.label)
        case.call_and_validate(headers=AUTHORIZATION, checks=[not_a_server_error])

    try:
        run()
    except Unsatisfiable:
        return []  # invalid inputs asked of an operation that has none (no parameter, or any string goes)
    except Exception as exc:  # noqa: BLE001 - a failure group of the checks, or the app's own exception
        return [f"{operation.label}: {type(exc).__name__}: {exc}"]
    return []


@pytest.mark.django_db(transaction=True, reset_sequences=True)
def test_schemathesis_finds_no_server_error_in_any_operation(api_schema):
    """Every operation of /api/schema/, as an acting staff user: the schema's examples, then valid and
    invalid generated inputs (schemathesis' positive and negative modes); not one 5xx."""
    calls, errors = [], []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        examples = api_schema.get_strategies_from_examples(operation)
        if examples:
            errors += server_errors_of(operation, st.one_of(examples), len(examples), calls)
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            errors += server_errors_of(operation, operation.as_strategy(generation_mode=mode), EXAMPLES_PER_MODE,
                                       calls)
    assert not errors, "\n\n".join(errors)
    called = {tuple(label.lower().split(" ", 1)) for label in calls}
    assert called == CONTRACT_OPERATIONS  # every operation was called, at least with valid inputs
