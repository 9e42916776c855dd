"""The demo: the simulated upstream, the scenario, the served site and ``manage.py demo``."""

import dataclasses
import os
import random
import signal
import socket
import threading
import time
from io import StringIO

import httpx
import pytest
from django.core.management import CommandError, call_command

from monitoring.demo import handlers, scenario
from monitoring.demo.scenario import LLM, NAMES, PAYMENTS, QUOTES, Timing, integration_entries
from monitoring.demo.site import SiteServer, parse_address
from monitoring.demo.upstream import DROPPED, Outage, RouteFaults, SimulatedUpstream
from integrations.dlq.models import DeadLetter
from integrations.management.commands.integrations import sync_integrations
from integrations.models import BreakerEvent, Integration
from monitoring.models import Alert


@pytest.fixture
def upstream():
    server = SimulatedUpstream()
    yield server
    server.stop()


# -- the simulated upstream ------------------------------------------------------------------------

def test_an_error_rate_of_100_percent_answers_every_request_with_the_error_status(upstream):
    upstream.add_route("/pay", RouteFaults(error_rate=1.0, error_status=502))
    upstream.add_route("/ok")
    upstream.start()
    assert [httpx.get(f"{upstream.url}/pay/charge").status_code for _ in range(5)] == [502] * 5
    assert httpx.post(f"{upstream.url}/ok/x", json={"a": 1}).json() == {
        "ok": True, "method": "POST", "path": "/ok/x", "received": {"a": 1}}
    assert upstream.answers() == {"/pay": {502: 5}, "/ok": {200: 1}}


def test_an_error_rate_answers_about_that_share_of_requests(upstream):
    upstream.rng = random.Random(7)
    upstream.add_route("/flaky", RouteFaults(error_rate=0.5))
    upstream.start()
    with httpx.Client(base_url=upstream.url) as client:
        statuses = [client.get("/flaky").status_code for _ in range(100)]
    assert 30 <= statuses.count(500) <= 70 and statuses.count(500) + statuses.count(200) == 100


def test_inside_an_outage_window_the_route_answers_503_and_outside_it_answers(upstream):
    now = [100.0]
    upstream.clock = lambda: now[0]
    upstream.add_route("/pay", RouteFaults(outages=(Outage(5, 10, every_s=20),)))
    upstream.start()  # at 100: elapsed 0
    assert httpx.get(f"{upstream.url}/pay").status_code == 200
    now[0] = 106  # 6 s in: down
    response = httpx.get(f"{upstream.url}/pay")
    assert response.status_code == 503 and "scheduled outage" in response.json()["error"]
    now[0] = 111  # 11 s in: up again
    assert httpx.get(f"{upstream.url}/pay").status_code == 200
    now[0] = 127  # 27 s in: the next cycle's window
    assert httpx.get(f"{upstream.url}/pay").status_code == 503


def test_an_outage_can_drop_the_connection_without_an_answer(upstream):
    upstream.add_route("/pay", RouteFaults(outages=(Outage(0, 3600),), outage_status=None))
    upstream.start()
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{upstream.url}/pay")
    assert upstream.answers() == {"/pay": {DROPPED: 1}}


def test_latency_delays_every_answer(upstream):
    upstream.add_route("/slow", RouteFaults(latency_ms=300))
    upstream.start()
    started = time.monotonic()
    assert httpx.get(f"{upstream.url}/slow").status_code == 200
    assert 0.3 <= time.monotonic() - started < 3


def test_faults_can_be_injected_while_it_runs(upstream):
    upstream.add_route("/pay")
    upstream.start()
    assert httpx.get(f"{upstream.url}/pay").status_code == 200
    upstream.set_faults("/pay", RouteFaults(error_rate=1.0, error_status=503))
    assert httpx.get(f"{upstream.url}/pay").status_code == 503
    with pytest.raises(KeyError, match="no route '/nope'"):
        upstream.set_faults("/nope", RouteFaults())


def test_the_longest_matching_route_answers_and_unknown_paths_get_404(upstream):
    upstream.add_route("/api", RouteFaults(error_rate=1.0))
    upstream.add_route("/api/health")
    upstream.start()
    assert httpx.get(f"{upstream.url}/api/health").status_code == 200
    assert httpx.get(f"{upstream.url}/api/other").status_code == 500
    assert httpx.get(f"{upstream.url}/apix").status_code == 404


def test_stop_wakes_sleeping_requests_joins_its_threads_and_closes_the_socket(upstream):
    upstream.add_route("/slow", RouteFaults(latency_ms=30_000))
    upstream.start()
    url, port = upstream.url, upstream.port
    answers = []
    client = threading.Thread(target=lambda: answers.append(httpx.get(f"{url}/slow", timeout=10).status_code))
    client.start()
    deadline = time.monotonic() + 10
    while upstream.in_flight() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.in_flight() == 1  # the request is sleeping out its latency
    started = time.monotonic()
    upstream.stop()
    assert time.monotonic() - started < 2
    client.join(5)
    assert answers == [503] and upstream.in_flight() == 0
    assert not [t for t in threading.enumerate() if t.name.startswith(f"demo-upstream-{port}")]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    upstream.stop()  # stopping twice is harmless


def test_the_upstream_listens_on_127_0_0_1_only(upstream):
    upstream.start()
    assert upstream.url.startswith("http://127.0.0.1:") and upstream._server.server_address[0] == "127.0.0.1"


@pytest.mark.parametrize("make, message", [
    (lambda: Outage(5, 5), "start_s < end_s"),
    (lambda: Outage(5, 30, every_s=20), "cannot end at 30"),
    (lambda: RouteFaults(error_rate=1.5), "error_rate"),
    (lambda: RouteFaults(error_status=700), "error_status"),
    (lambda: RouteFaults(latency_ms=-1), "latency"),
])
def test_impossible_faults_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- the scenario's pieces ---------------------------------------------------------------------------

def test_a_charge_is_only_ever_sent_to_127_0_0_1():
    with pytest.raises(ValueError, match="127.0.0.1 only"):
        handlers.charge({"order": "1", "amount_cents": 100, "upstream": "https://payments.example"})


@pytest.mark.django_db
def test_the_demo_integrations_are_created_once_then_left_unchanged():
    entries = integration_entries(Timing())
    assert [o.action for o in sync_integrations(entries, "demo")] == ["created"] * 3
    assert [o.action for o in sync_integrations(entries, "demo")] == ["unchanged"] * 3
    payments = Integration.objects.get(name=PAYMENTS)
    assert (payments.failure_threshold, payments.reset_timeout_s) == (3, Timing().payments_reset_timeout_s)


@pytest.mark.django_db(transaction=True)
def test_the_site_can_be_served_from_the_demos_process():
    site = SiteServer("127.0.0.1", 0).start()
    try:
        response = httpx.get(f"{site.url}/admin/login/", timeout=10)
        assert response.status_code == 200 and "csrfmiddlewaretoken" in response.text
    finally:
        site.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{site.url}/admin/login/", timeout=2)


def test_serve_takes_a_port_or_an_address_and_port():
    assert parse_address("8001") == ("127.0.0.1", 8001)
    assert parse_address("0.0.0.0:8002") == ("0.0.0.0", 8002)
    with pytest.raises(ValueError, match="PORT or ADDRESS:PORT"):
        parse_address("localhost:http")


# -- manage.py demo ------------------------------------------------------------------------------------

# ten times faster, but completions still outlast the bulkhead's 100 ms wait, so the third worker is shed
FAST = dataclasses.replace(Timing().faster(10), quotes_hourly_limit=5, llm_latency_ms=250, llm_jitter_ms=150)


@pytest.fixture
def own_response_cache(settings):
    """Cached responses in a cache of this process: another test run on the same Redis database clears
    every key of the shared cache's prefix at each of its tests, last known values included."""
    settings.CACHES = {**settings.CACHES, "demo": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                                                   "LOCATION": "demo-test"}}
    settings.RESILIENCE_CACHE_ALIAS = "demo"


@pytest.mark.django_db(transaction=True)
def test_the_demo_opens_and_closes_a_breaker_fills_a_quota_and_leaves_dead_letters(own_response_cache):
    out = StringIO()
    started = time.monotonic()
    call_command("demo", duration=4, timing=FAST, stdout=out, stderr=StringIO())
    assert time.monotonic() - started < 15
    text = out.getvalue()
    transitions = set(BreakerEvent.objects.filter(integration__name=PAYMENTS).values_list("to_state", flat=True))
    assert transitions == {"open", "half_open", "closed"}  # the outage (0.6-1.8 s) came and went
    assert DeadLetter.objects.filter(integration_name=PAYMENTS, handler_name="demo.charge").exists()
    assert Alert.objects.filter(integration__name=QUOTES, kind=Alert.QUOTA).exists()
    summary = {line.split(":")[0].strip(): line for line in text.splitlines() if line.startswith("  demo-")}
    assert set(summary) == set(NAMES)
    assert "over quota" in summary[QUOTES] and "fallback" in summary[QUOTES]
    assert "shed" in summary[LLM]
    assert "upstream /payments: 201:" in text and "503:" in text
    assert "[   " in text  # status lines were printed
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("demo-", *NAMES))]


@pytest.mark.django_db(transaction=True)
def test_a_quiet_demo_prints_only_its_start_and_summary():
    out = StringIO()
    call_command("demo", duration=1, timing=FAST, quiet=True, stdout=out, stderr=StringIO())
    text = out.getvalue()
    assert "Simulated upstream: http://127.0.0.1:" in text and "Demo finished after" in text
    assert "[   " not in text


@pytest.mark.parametrize("options, message", [
    ({"duration": 0}, "--duration must be more than 0"),
    ({"port": 70000}, "--port must be from 1 to 65535"),
    ({"serve": "nowhere:port"}, "--serve: expected PORT or ADDRESS:PORT"),
])
def test_bad_options_are_refused_before_anything_starts(options, message):
    with pytest.raises(CommandError, match=message):
        call_command("demo", **options)


@pytest.mark.django_db(transaction=True)
def test_a_port_in_use_is_an_error_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CommandError, match=f"cannot listen on 127.0.0.1:{port}"):
            call_command("demo", duration=1, port=port, timing=FAST, stdout=StringIO())


@pytest.mark.django_db(transaction=True)
def test_sigterm_stops_the_demo_cleanly_as_ctrl_c_does(own_response_cache):
    received = []

    def fallback(*args):  # receives the signal if the demo did not take it (instead of ending the test run)
        received.append(args)

    previous = signal.signal(signal.SIGTERM, fallback)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    out = StringIO()
    try:
        timer.start()
        started = time.monotonic()
        call_command("demo", duration=60, timing=FAST, stdout=out, stderr=StringIO())
        elapsed = time.monotonic() - started
        assert signal.getsignal(signal.SIGTERM) is fallback  # the demo put the handler back
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert received == [] and elapsed < 15
    assert "Stopping..." in out.getvalue() and "Demo finished after" in out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_a_worker_that_breaks_stops_the_demo_with_its_error(monkeypatch):
    def broken(self, index):
        raise RuntimeError("quotes worker bug")

    monkeypatch.setattr(scenario.Traffic, "quotes", broken)
    with pytest.raises(CommandError, match="a demo worker failed: RuntimeError\\('quotes worker bug'\\)"):
        call_command("demo", duration=30, timing=FAST, stdout=StringIO(), stderr=StringIO())
