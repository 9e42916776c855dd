"""Health checks against a real HTTP server on 127.0.0.1, and registered Python checks."""

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.management import CommandError, call_command

from integrations.models import Integration
from monitoring import healthchecks
from monitoring.healthchecks import health_check, probe_http, probe_python
from monitoring.models import CRITICAL, Alert, HealthCheck, HealthCheckResult
from monitoring.tasks import run_due_health_checks

pytestmark = pytest.mark.django_db

SLOW_S = 1.0


class Upstream:
    """What the server answers on /health: a status that a test can change."""

    status = 200


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(SLOW_S)
        status = Upstream.status if self.path == "/health" else 200 if self.path == "/slow" else 404
        body = b'{"ok": true}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def healthy_upstream():
    Upstream.status = 200
    yield


@pytest.fixture
def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def billing():
    return Integration.objects.create(name="billing")


@pytest.fixture
def registered():
    names = []

    def register(name, fn):
        health_check(name)(fn)
        names.append(name)

    yield register
    for name in names:
        healthchecks.unregister(name)


def test_an_http_probe_is_healthy_on_the_expected_status(server):
    outcome = probe_http(f"{server}/health", 200, 2.0)
    assert outcome.ok and outcome.status_code == 200 and outcome.latency_ms > 0


def test_an_http_probe_fails_on_another_status(server):
    Upstream.status = 503
    outcome = probe_http(f"{server}/health", 200, 2.0)
    assert (outcome.ok, outcome.status_code, outcome.error) == (False, 503, "status 503, expected 200")


def test_an_http_probe_fails_past_its_timeout(server):
    started = time.monotonic()
    outcome = probe_http(f"{server}/slow", 200, 0.2)
    assert not outcome.ok and "no answer within 200 ms" in outcome.error
    assert time.monotonic() - started < SLOW_S


def test_an_http_probe_fails_when_nothing_listens(closed_port):
    outcome = probe_http(f"http://127.0.0.1:{closed_port}/health", 200, 2.0)
    assert not outcome.ok and "ConnectError" in outcome.error


def test_a_failing_probe_raises_a_critical_alert_and_recovery_resolves_it(server, billing):
    check = HealthCheck.objects.create(integration=billing, url=f"{server}/health")
    check.run()
    assert (check.status, check.consecutive_successes) == (HealthCheck.UP, 1)
    assert not Alert.objects.exists()

    Upstream.status = 500
    check.run()
    check.run()
    check.refresh_from_db()
    assert (check.status, check.consecutive_failures, check.consecutive_successes) == (HealthCheck.DOWN, 2, 0)
    alert = Alert.objects.get(kind=Alert.HEALTH_CHECK, integration=billing)
    assert alert.severity == CRITICAL and alert.occurrences == 1 and "status 500" in alert.message

    Upstream.status = 200
    check.run()
    check.refresh_from_db()
    alert.refresh_from_db()
    assert (check.status, check.consecutive_successes) == (HealthCheck.UP, 1)
    assert alert.status == Alert.RESOLVED and alert.resolution == "health check passed"
    results = list(HealthCheckResult.objects.filter(health_check=check).order_by("id"))
    assert [r.ok for r in results] == [True, False, False, True]
    assert [r.status_code for r in results] == [200, 500, 500, 200]
    assert all(r.latency_ms > 0 for r in results)


def test_an_upstream_is_down_only_after_the_configured_consecutive_failures(server, billing):
    check = HealthCheck.objects.create(integration=billing, url=f"{server}/health", failures_before_down=3)
    check.run()
    Upstream.status = 503
    check.run()
    check.run()
    assert check.status == HealthCheck.UP and not Alert.objects.exists()
    check.run()
    assert check.status == HealthCheck.DOWN and Alert.objects.active().count() == 1


def test_a_python_check_passes_fails_and_times_out(registered):
    registered("ok", lambda: None)
    registered("says-no", lambda: False)
    registered("raises", lambda: 1 / 0)
    registered("hangs", lambda: time.sleep(SLOW_S))
    assert probe_python("ok", 1.0).ok
    assert probe_python("says-no", 1.0).error == "the check returned False"
    assert probe_python("raises", 1.0).error == "ZeroDivisionError: division by zero"
    assert probe_python("hangs", 0.1).error == "did not finish within 100 ms"
    assert probe_python("nobody", 1.0).error == "no Python check is registered as 'nobody'"


def test_a_check_name_is_registered_once(registered):
    registered("db", lambda: None)
    with pytest.raises(ValueError, match="already registered as 'db'"):
        health_check("db")(lambda: None)


def test_a_python_health_check_moves_the_integrations_health(billing, registered):
    verdict = {"up": False}
    registered("billing-db", lambda: verdict["up"])
    check = HealthCheck.objects.create(integration=billing, kind=HealthCheck.PYTHON, check_name="billing-db")
    check.run()
    assert check.status == HealthCheck.DOWN
    verdict["up"] = True
    check.run()
    assert check.status == HealthCheck.UP and not Alert.objects.active().exists()


def test_validation_names_what_a_check_lacks(billing, registered):
    registered("known", lambda: None)
    with pytest.raises(Exception, match="needs a URL"):
        HealthCheck(integration=billing).full_clean()
    with pytest.raises(Exception, match="No Python check is registered as 'unknown'"):
        HealthCheck(integration=billing, kind=HealthCheck.PYTHON, check_name="unknown").full_clean()
    HealthCheck(integration=billing, kind=HealthCheck.PYTHON, check_name="known").full_clean()


def test_the_schedule_runs_only_due_and_enabled_checks(server, billing):
    search = Integration.objects.create(name="search")
    orders = Integration.objects.create(name="orders")
    HealthCheck.objects.create(integration=billing, url=f"{server}/health")
    recent = HealthCheck.objects.create(integration=search, url=f"{server}/health")
    recent.run()
    HealthCheck.objects.create(integration=orders, url=f"{server}/health", enabled=False)
    assert run_due_health_checks() == {"billing": HealthCheck.UP}


def test_the_healthcheck_command_runs_the_named_checks(server, billing, capsys):
    search = Integration.objects.create(name="search")
    HealthCheck.objects.create(integration=billing, url=f"{server}/health")
    HealthCheck.objects.create(integration=search, url=f"{server}/missing")
    call_command("healthcheck", "billing")
    out = capsys.readouterr().out
    assert "billing" in out and "up" in out and "search" not in out
    with pytest.raises(CommandError, match="Down: search"):
        call_command("healthcheck")
    assert "status 404, expected 200" in capsys.readouterr().out


def test_the_healthcheck_command_refuses_an_unknown_name_before_running_anything(server, billing):
    check = HealthCheck.objects.create(integration=billing, url=f"{server}/health")
    with pytest.raises(CommandError, match="No health check for: nope"):
        call_command("healthcheck", "billing", "nope")
    check.refresh_from_db()
    assert check.last_checked_at is None
