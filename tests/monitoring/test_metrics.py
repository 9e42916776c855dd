"""Prometheus metrics: values after known traffic, the scrape and its token, a multi-worker gunicorn, the rules
and the dashboard."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from django.conf import settings as django_settings
from django.core.cache import caches
from django.db import DatabaseError, connection
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from integrations.models import Integration
from integrations.resilience import Fallback, execute
from integrations.resilience.leases import LEASE_TTL_S
from integrations.resilience.events import SharedStateChanged
from monitoring import metrics, metrics_scrape

ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = Path(__file__).resolve().parents[1]
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
GUNICORN_CONF = ROOT / "deploy" / "gunicorn.conf.py"
TOKEN = "metrics-test-token"


def unique(prefix: str) -> str:
    """An integration name no other test used: the process-wide registry keeps every series."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def parse(text: str) -> dict:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    return parse(response.content.decode())


def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("RESILIENCE_TESTS_REQUIRE_PROMTOOL"):
        pytest.fail("promtool is missing although .ci/run installed Debian's prometheus package")
    pytest.skip("promtool not installed (.ci/run installs Debian's prometheus package)")


def run_promtool(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run([promtool(), *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def metered(make_engine, bus):
    """An engine on a FakeClock whose events drive the metrics: ``metered(**knobs)`` gives a fresh integration."""
    metrics.install(bus)

    def build(**knobs):
        name = unique("metered")
        make_engine(name=name, **knobs)
        return name

    return build


# -- counters and the histogram after known traffic --------------------------------------------


def test_calls_are_counted_by_outcome_and_source(metered, upstream):
    name = metered(max_retries=0)
    for _ in range(3):
        execute(name, upstream("value"))
    for _ in range(2):
        execute(name, upstream(ConnectionError("refused")))
    execute(name, upstream(TimeoutError()), fallbacks=(Fallback.value("default"),))

    assert sample("resilience_calls_total", integration=name, outcome="success", source="live") == 3
    assert sample("resilience_calls_total", integration=name, outcome="network", source="live") == 2
    assert sample("resilience_calls_total", integration=name, outcome="timeout", source="fallback") == 1
    assert sample("resilience_fallbacks_total", integration=name, kind="value") == 1


def test_refused_calls_are_counted_under_their_refusal(metered, upstream):
    name = metered(mode="forced_open", max_retries=0)
    for _ in range(2):
        execute(name, upstream("never called"))

    assert sample("resilience_calls_total", integration=name, outcome="circuit_open", source="live") == 2


def test_the_latency_histogram_puts_each_call_in_its_bucket(metered, upstream, clock):
    name = metered(max_retries=0, slow_call_ms=10_000)
    for _ in range(2):
        execute(name, upstream("fast", clock=clock, takes=0.2))
    execute(name, upstream("slow", clock=clock, takes=3.0))

    assert sample("resilience_call_duration_seconds_bucket", integration=name, le="0.1") == 0
    assert sample("resilience_call_duration_seconds_bucket", integration=name, le="0.25") == 2
    assert sample("resilience_call_duration_seconds_bucket", integration=name, le="2.5") == 2
    assert sample("resilience_call_duration_seconds_bucket", integration=name, le="5.0") == 3
    assert sample("resilience_call_duration_seconds_count", integration=name) == 3
    assert sample("resilience_call_duration_seconds_sum", integration=name) == pytest.approx(3.4)


def test_retries_are_counted(metered, upstream):
    name = metered(max_retries=2, base_delay_ms=10, jitter=False)
    result = execute(name, upstream(ConnectionError(), ConnectionError(), "third time lucky"))

    assert result.ok and result.attempts == 3
    assert sample("resilience_retries_total", integration=name) == 2
    assert sample("resilience_calls_total", integration=name, outcome="success", source="live") == 1


def test_cache_hits_and_misses_are_counted(metered, upstream):
    name = metered(cache_ttl_s=60, max_retries=0)
    lookup = upstream("cached value", name="lookup")
    execute(name, lookup, 1)
    execute(name, lookup, 1)
    execute(name, lookup, 2)

    assert lookup.calls == 2
    assert sample("resilience_cache_hits_total", integration=name) == 1
    assert sample("resilience_cache_misses_total", integration=name) == 2
    assert sample("resilience_calls_total", integration=name, outcome="success", source="cache") == 1


def test_fallbacks_are_counted_by_kind(metered, upstream):
    name = metered(max_retries=0)
    keeps_last = (Fallback.last_known(),)
    execute(name, upstream("fresh", name="quote"), "EUR", fallbacks=keeps_last)
    execute(name, upstream(ConnectionError(), name="quote"), "EUR", fallbacks=keeps_last)
    execute(name, upstream(ConnectionError()), fallbacks=(Fallback.call(lambda: "computed"),))

    assert sample("resilience_fallbacks_total", integration=name, kind="last_known") == 1
    assert sample("resilience_fallbacks_total", integration=name, kind="call") == 1
    assert sample("resilience_calls_total", integration=name, outcome="network", source="fallback") == 2


def test_breaker_transitions_are_counted_from_and_to(metered, upstream, clock):
    name = metered(max_retries=0, failure_threshold=2, reset_timeout_s=10, success_threshold=1)
    for _ in range(2):
        execute(name, upstream(ConnectionError()))
    clock.advance(11)
    execute(name, upstream("recovered"))

    assert sample("resilience_breaker_transitions_total", integration=name, from_state="closed", to_state="open") == 1
    assert sample("resilience_breaker_transitions_total", integration=name, from_state="open",
                  to_state="half_open") == 1
    assert sample("resilience_breaker_transitions_total", integration=name, from_state="half_open",
                  to_state="closed") == 1


def test_the_shared_state_gauge_follows_its_events(metered, bus):
    metered()
    bus.publish(SharedStateChanged(shared=False, reason="redis unreachable", at=0.0))
    assert sample("resilience_shared_state_fallback") == 1
    bus.publish(SharedStateChanged(shared=True, reason="redis back", at=1.0))
    assert sample("resilience_shared_state_fallback") == 0


# -- the scrape: live gauges from the store and the database ----------------------------------------


def probe_integration(**knobs) -> Integration:
    knobs = {"max_retries": 0, "timeout_enforcement": "inline", "cache_ttl_s": 0, **knobs}
    return Integration.objects.create(name=unique("row"), **knobs)


@pytest.mark.django_db
def test_a_scrape_reports_calls_breaker_state_and_quota_of_integration_rows(client, upstream):
    row = probe_integration(failure_threshold=1, hourly_limit=10, daily_limit=100, slow_call_ms=1500)
    execute(row.name, upstream("ok"))
    execute(row.name, upstream(ConnectionError()))

    samples = scrape(client)

    assert value(samples, "resilience_calls_total", integration=row.name, outcome="success", source="live") == 1
    assert value(samples, "resilience_calls_total", integration=row.name, outcome="network", source="live") == 1
    assert value(samples, "resilience_breaker_transitions_total", integration=row.name, from_state="closed",
                 to_state="open") == 1
    assert value(samples, "resilience_breaker_state", integration=row.name, mode="normal") == 2
    assert value(samples, "resilience_quota_usage_ratio", integration=row.name, window="hourly") == pytest.approx(0.2)
    assert value(samples, "resilience_quota_usage_ratio", integration=row.name, window="daily") == pytest.approx(0.02)
    assert value(samples, "resilience_slow_call_threshold_seconds", integration=row.name) == 1.5
    assert value(samples, "resilience_metrics_source_up", source="integrations") == 1


@pytest.mark.django_db
def test_a_scrape_reports_the_calls_and_failure_ratio_of_each_breakers_window(client, upstream):
    timed = probe_integration(window_type="time", window_duration_s=30, failure_threshold=100)
    idle = probe_integration()
    execute(timed.name, upstream(ConnectionError()))
    for _ in range(3):
        execute(timed.name, upstream("ok"))

    samples = scrape(client)

    assert value(samples, "resilience_breaker_window_calls", integration=timed.name, window="time") == 4
    assert value(samples, "resilience_breaker_window_failure_ratio", integration=timed.name, window="time") == 0.25
    assert value(samples, "resilience_breaker_window_calls", integration=idle.name, window="count") == 0
    assert value(samples, "resilience_breaker_window_failure_ratio", integration=idle.name, window="count") is None


@pytest.mark.django_db
def test_windows_without_a_limit_report_no_quota_ratio(client):
    row = probe_integration(hourly_limit=None, daily_limit=50)

    samples = scrape(client)

    assert value(samples, "resilience_quota_usage_ratio", integration=row.name, window="hourly") is None
    assert value(samples, "resilience_quota_usage_ratio", integration=row.name, window="daily") == 0


@pytest.mark.django_db
def test_forced_modes_report_the_state_they_force(client):
    forced_open, forced_closed, shadow = probe_integration(), probe_integration(), probe_integration()
    forced_open.force_open()
    forced_closed.force_closed()
    shadow.set_mode("metrics_only")

    samples = scrape(client)

    assert value(samples, "resilience_breaker_state", integration=forced_open.name, mode="forced_open") == 2
    assert value(samples, "resilience_breaker_state", integration=forced_closed.name, mode="forced_closed") == 0
    assert value(samples, "resilience_breaker_state", integration=shadow.name, mode="metrics_only") == 0


def installed_model(model_path: tuple[str, str]):
    model = metrics_scrape.optional_model(*model_path)
    if model is None:
        pytest.skip(f"{'.'.join(model_path)} is not built yet")
    return model


def redo_for_metrics_test(payload):
    """The dead letter handler of the test below: never run, the entry only waits."""


@pytest.mark.django_db
def test_dead_letters_are_reported_by_status(client, upstream):
    installed_model(metrics_scrape.DEAD_LETTER_MODEL)
    from integrations.dlq import DeadLetter, dead_letter_handler

    dead_letter_handler("metrics-test.redo")(redo_for_metrics_test)
    row = probe_integration()
    empty = scrape(client)
    execute(row.name, upstream(ConnectionError()), dead_letter=DeadLetter("metrics-test.redo", {"order": 7}))

    samples = scrape(client)

    statuses = ("pending", "retrying", "succeeded", "dead", "discarded")
    assert {status: value(empty, "resilience_dead_letters", status=status) for status in statuses} == \
        dict.fromkeys(statuses, 0)
    assert value(samples, "resilience_dead_letters", status="pending") == 1
    assert value(samples, "resilience_metrics_source_up", source="dead_letters") == 1


@pytest.mark.django_db
def test_unresolved_alerts_are_reported_by_severity(client, django_user_model):
    alert_model = installed_model(metrics_scrape.ALERT_MODEL)
    row = probe_integration()
    critical, _ = alert_model.raise_or_update("unavailable", "critical", "breaker open", integration=row)
    acknowledged, _ = alert_model.raise_or_update("quota", "warning", "quota at 85 %", integration=row)
    resolved, _ = alert_model.raise_or_update("slow_calls", "warning", "slow", integration=row)
    acknowledged.acknowledge(django_user_model.objects.create(username="operator"))
    resolved.resolve()

    samples = scrape(client)

    assert value(samples, "resilience_alerts_open", severity="critical") == 1
    assert value(samples, "resilience_alerts_open", severity="warning") == 1
    assert value(samples, "resilience_metrics_source_up", source="alerts") == 1


@pytest.mark.django_db
def test_a_model_not_built_yet_is_left_out_cleanly(client, monkeypatch):
    monkeypatch.setattr(metrics_scrape, "DEAD_LETTER_MODEL", ("integrations.not_built_yet.models", "DeadLetter"))

    samples = scrape(client)

    assert value(samples, "resilience_metrics_source_up", source="dead_letters") is None
    assert not any(name == metrics_scrape.DEAD_LETTERS_METRIC for name, _ in samples)


def test_a_broken_model_module_is_not_mistaken_for_an_absent_one(tmp_path, monkeypatch):
    (tmp_path / "broken_models_for_metrics.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        metrics_scrape.optional_model("broken_models_for_metrics", "DeadLetter")


@pytest.mark.django_db
def test_an_unreadable_source_is_reported_and_the_rest_still_served(client, monkeypatch, caplog, metered, upstream):
    name = metered(max_retries=0)
    execute(name, upstream("ok"))

    def database_down():
        raise DatabaseError("connection refused")

    monkeypatch.setattr(metrics_scrape, "LIVE_STATE_SOURCES", (("integrations", database_down),))

    samples = scrape(client)

    assert value(samples, "resilience_metrics_source_up", source="integrations") == 0
    assert value(samples, "resilience_calls_total", integration=name, outcome="success", source="live") == 1
    assert "could not read integrations" in caplog.text


@pytest.mark.django_db
def test_a_failed_query_spoils_no_other_source(client, monkeypatch):
    # On PostgreSQL a failed query aborts the surrounding transaction; each source reads in its own savepoint.
    row = probe_integration()

    def missing_table():
        with connection.cursor() as cursor:
            cursor.execute("SELECT status FROM a_table_that_does_not_exist")

    monkeypatch.setattr(metrics_scrape, "LIVE_STATE_SOURCES",
                        (("dead_letters", missing_table), ("integrations", metrics_scrape.integration_families)))

    samples = scrape(client)

    assert value(samples, "resilience_metrics_source_up", source="dead_letters") == 0
    assert value(samples, "resilience_metrics_source_up", source="integrations") == 1
    assert value(samples, "resilience_breaker_state", integration=row.name, mode="normal") == 0


# -- the token ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_are_open_without_a_token(client, settings):
    settings.RESILIENCE_METRICS_TOKEN = ""

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response["Content-Type"] == CONTENT_TYPE_LATEST


@pytest.mark.django_db
@pytest.mark.parametrize("authorization, query, status", [
    (None, "", 401),
    ("Basic bWV0cmljczp0b2tlbg==", "", 401),
    ("Bearer", "", 401),
    ("Bearer wrong-token", "", 403),
    (f"Bearer {TOKEN}x", "", 403),
    (None, f"?token={TOKEN}", 401),
    (f"Bearer {TOKEN}", "", 200),
    (f"bearer  {TOKEN} ", "", 200),
])
def test_the_token_is_required_when_set(client, settings, authorization, query, status):
    settings.RESILIENCE_METRICS_TOKEN = TOKEN
    headers = {} if authorization is None else {"Authorization": authorization}

    response = client.get(f"/metrics{query}", headers=headers)

    assert response.status_code == status
    if status == 401:
        assert response["WWW-Authenticate"] == 'Bearer realm="metrics"'
        assert response.json()["error"]["code"] == "metrics_token_required"
    if status == 403:
        assert response.json()["error"]["code"] == "metrics_token_invalid"


def test_metrics_answer_only_reads(client, settings):
    settings.RESILIENCE_METRICS_TOKEN = ""

    assert client.post("/metrics").status_code == 405


# -- django-prometheus: requests, database, cache --------------------------------------------------


@pytest.mark.django_db
def test_requests_and_queries_are_counted_by_django_prometheus(client):
    assert django_settings.DATABASES["default"]["ENGINE"].startswith("django_prometheus.db.backends.")
    labels = {"alias": "default", "vendor": connection.vendor}
    before = sample("django_db_execute_total", **labels)
    Integration.objects.count()
    assert sample("django_db_execute_total", **labels) == before + 1

    requests_before = sample("django_http_requests_total_by_method_total", method="GET")
    client.get("/metrics")
    assert sample("django_http_requests_total_by_method_total", method="GET") == requests_before + 1


def test_cached_falsy_values_come_back_as_stored():
    # django_prometheus's LocMemCache returns the default for a stored 0, "" or []: it is not used for that reason.
    cache = caches["default"]
    for key, stored in (("metrics-test-zero", 0), ("metrics-test-empty", ""), ("metrics-test-list", [])):
        cache.set(key, stored, 30)
        assert cache.get(key, "default") == stored
        cache.delete(key)


@pytest.mark.skipif(not django_settings.REDIS_URL, reason="django_prometheus's Redis backend is used with REDIS_URL")
def test_redis_cache_gets_are_counted():
    cache = caches["default"]
    before = sample("django_cache_get_total", backend="redis")
    misses_before = sample("django_cache_get_misses_total", backend="redis")
    cache.get("metrics-test-absent-key")
    assert sample("django_cache_get_total", backend="redis") == before + 1
    assert sample("django_cache_get_misses_total", backend="redis") == misses_before + 1


# -- a real multi-worker gunicorn --------------------------------------------------------------------

PREPARE_SITE = """
import sys
import django
django.setup()
from django.core.management import call_command
from integrations.models import Integration
call_command("migrate", verbosity=0)
Integration.objects.create(
    name=sys.argv[1], max_retries=1, base_delay_ms=0, max_delay_ms=0, jitter=False, retry_budget_percent=None,
    failure_threshold=1000, failure_rate_threshold=0, slow_call_rate_threshold=0, timeout_enforcement="inline",
    hourly_limit=100_000,
)
"""

WORKERS = 3


@dataclass
class GunicornSite:
    url: str
    integration: str
    metrics_dir: Path
    log: Path

    def scrape(self) -> str:
        response = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert response.status_code == 200, response.text
        return response.text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, what: str, timeout: float = 30.0, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = condition()
        if outcome:
            return outcome
        time.sleep(0.1)
    pytest.fail(f"{what} not within {timeout:.0f}s" + (f"; gunicorn said:\n{log.read_text()}" if log else ""))


@pytest.fixture
def gunicorn_site(tmp_path):
    """The site under gunicorn (deploy/gunicorn.conf.py, 3 workers, its own SQLite database), stopped at the end."""
    integration = unique("probe")
    metrics_dir = tmp_path / "prometheus"
    log = tmp_path / "gunicorn.log"
    env = {
        **{key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"},
        "DEBUG": "true",
        "ALLOWED_HOSTS": "127.0.0.1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'site.sqlite3'}",
        "RESILIENCE_METRICS_TOKEN": TOKEN,
    }
    subprocess.run([sys.executable, "-c", PREPARE_SITE, integration], cwd=ROOT, check=True, timeout=120,
                   env={**env, "DJANGO_SETTINGS_MODULE": "resilience_site.settings"})
    port = free_port()
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", str(GUNICORN_CONF), "--workers", str(WORKERS),
             "--bind", f"127.0.0.1:{port}", "--pythonpath", str(TESTS_DIR), "--no-control-socket"],
            cwd=ROOT, env={**env, "DJANGO_SETTINGS_MODULE": "metrics_probe_site.settings",
                           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    site = GunicornSite(f"http://127.0.0.1:{port}", integration, metrics_dir, log)

    def answers():
        if server.poll() is not None:
            pytest.fail(f"gunicorn exited with {server.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(f"{site.url}/metrics", timeout=2).status_code == 401
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, "gunicorn answering", log=log)
        yield site
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


@pytest.mark.slow
def test_a_multi_worker_gunicorn_scrape_adds_up_across_workers_and_passes_promtool(gunicorn_site):
    site = gunicorn_site
    outcomes = ["ok"] * 15 + ["fail"] * 9

    def call(outcome):
        return httpx.get(f"{site.url}/probe/{site.integration}/{outcome}", timeout=10).json()

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(call, outcomes))
    served_by = {answer["pid"] for answer in answers}
    assert len(served_by) >= 2, "the traffic must reach several workers for the sums to mean anything"

    def totals(text: str) -> dict:
        samples = parse(text)
        name = site.integration
        return {
            "success": value(samples, "resilience_calls_total", integration=name, outcome="success", source="live"),
            "network": value(samples, "resilience_calls_total", integration=name, outcome="network", source="live"),
            "retries": value(samples, "resilience_retries_total", integration=name),
            "timed": value(samples, "resilience_call_duration_seconds_count", integration=name),
            "breaker": value(samples, "resilience_breaker_state", integration=name, mode="normal"),
            "fallback": value(samples, "resilience_shared_state_fallback"),
        }

    expected = {"success": 15, "network": 9, "retries": 9, "timed": 24, "breaker": 0, "fallback": 0}
    text = site.scrape()
    assert totals(text) == expected
    if django_settings.RESILIENCE_REDIS_URL:  # shared quota: every worker's 33 attempts, counted once
        # a worker's quota units leased ahead and not spent count as used until given back, within a
        # lease's life and a flush (docs/shared-state.md): the scrape reads exactly 33 by then
        given_back_by = time.monotonic() + 10 * (LEASE_TTL_S + 0.5)
        while True:
            quota = value(parse(site.scrape()), "resilience_quota_usage_ratio", integration=site.integration,
                          window="hourly")
            if quota <= 33 / 100_000 or time.monotonic() > given_back_by:
                break
            time.sleep(0.1)
        assert quota == pytest.approx(33 / 100_000)
    assert "pid=" not in text  # gauges are merged, not one series per worker
    for line in text.splitlines():
        if line.startswith("resilience_metrics_source_up"):
            assert line.endswith(" 1.0"), line
    run_promtool("check", "metrics", stdin=text)
    assert httpx.get(f"{site.url}/metrics", timeout=10).status_code == 401

    # A worker that dies keeps its counts in the totals; its live gauge leaves the merge.
    victim = min(served_by)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not (site.metrics_dir / f"gauge_livemax_{victim}.db").exists(),
             "the dead worker's live gauge file removed by child_exit", log=site.log)
    wait_for(lambda: len(list(site.metrics_dir.glob("gauge_livemax_*.db"))) == WORKERS,
             "gunicorn replacing the dead worker", log=site.log)
    for _ in range(WORKERS * 2):  # whichever worker answers, the new one included
        assert totals(site.scrape()) == expected


# -- alert rules and dashboard ------------------------------------------------------------------------


def test_the_alert_rules_pass_promtool_check_rules():
    output = run_promtool("check", "rules", str(ALERT_RULES))
    assert "SUCCESS" in output


def rule_unit_tests(rules_file: Path) -> tuple[dict, set[str]]:
    """promtool's unit tests of the rules (crafted series: which alerts fire, which must not), and the alerts tested."""
    calls = "resilience_calls_total{{integration={0!r},outcome={1!r},source=\"live\"}}"
    bucket = "resilience_call_duration_seconds_bucket{{integration={0!r},le={1!r}}}"
    series = [
        # billing: half its calls fail -> warning only; search: 90 % -> warning and critical
        (calls.format("billing", "success"), "0+60x30"),
        (calls.format("billing", "server_error"), "0+60x30"),
        (calls.format("search", "success"), "0+10x30"),
        (calls.format("search", "timeout"), "0+90x30"),
        # the callers' own mistakes, and too little traffic to judge: no alert
        (calls.format("lookups", "success"), "0+10x30"),
        (calls.format("lookups", "client_error"), "0+90x30"),
        (calls.format("quiet", "timeout"), "0+1x30"),
        ('resilience_breaker_state{integration="billing",mode="normal"}', "2x30"),
        ('resilience_breaker_state{integration="shadow",mode="metrics_only"}', "2x30"),
        ('resilience_breaker_state{integration="manual",mode="forced_open"}', "2x30"),
        ('resilience_breaker_state{integration="search",mode="normal"}', "0x30"),
        # slowpoke's calls take 1 to 10 s against a 5 s threshold; fast's under 1 s
        (bucket.format("slowpoke", "1.0"), "0x30"),
        (bucket.format("slowpoke", "10.0"), "0+60x30"),
        (bucket.format("slowpoke", "+Inf"), "0+60x30"),
        ('resilience_slow_call_threshold_seconds{integration="slowpoke"}', "5x30"),
        (bucket.format("fast", "1.0"), "0+60x30"),
        (bucket.format("fast", "10.0"), "0+60x30"),
        (bucket.format("fast", "+Inf"), "0+60x30"),
        ('resilience_slow_call_threshold_seconds{integration="fast"}', "5x30"),
        ('resilience_dead_letters{status="pending"}', "150x30"),
        ('resilience_dead_letters{status="retrying"}', "20x30"),
        ('resilience_dead_letters{status="dead"}', "500+1x30"),  # one more dies every minute
        ("resilience_shared_state_fallback", "1x30"),
        ('resilience_metrics_source_up{source="dead_letters"}', "0x30"),
        ('resilience_metrics_source_up{source="integrations"}', "1x30"),
    ]
    firing = {
        "ResilienceErrorRateHigh": [{"severity": "warning", "integration": "billing"},
                                    {"severity": "warning", "integration": "search"}],
        "ResilienceErrorRateCritical": [{"severity": "critical", "integration": "search"}],
        "ResilienceBreakerOpen": [{"severity": "critical", "integration": "billing"}],
        "ResilienceLatencyP99High": [{"severity": "warning", "integration": "slowpoke"}],
        "ResilienceDeadLetterBacklog": [{"severity": "warning"}],
        "ResilienceDeadLettersDied": [{"severity": "warning"}],
        "ResilienceSharedStateLost": [{"severity": "warning"}],
        "ResilienceMetricsSourceDown": [{"severity": "warning", "source": "dead_letters"}],
    }
    alert_rules = [{"eval_time": "20m", "alertname": name, "exp_alerts": [{"exp_labels": labels} for labels in fired]}
                   for name, fired in firing.items()]
    alert_rules.append({"eval_time": "1m", "alertname": "ResilienceBreakerOpen", "exp_alerts": []})  # not for 2m yet
    return {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
                   "alert_rule_test": alert_rules}],
    }, set(firing)


def test_each_alert_fires_on_crafted_series_and_only_then(tmp_path):
    rules = yaml.safe_load(ALERT_RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # promtool compares annotations verbatim; check rules validates them
    rules_file = tmp_path / "alerts.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    unit_tests, tested = rule_unit_tests(rules_file)
    tests_file = tmp_path / "alerts_test.yml"
    tests_file.write_text(yaml.safe_dump(unit_tests))

    run_promtool("test", "rules", str(tests_file))
    assert tested == {rule["alert"] for group in rules["groups"] for rule in group["rules"]}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert all(panel.get("targets") for panel in panels)
    return [target["expr"] for panel in panels for target in panel["targets"]]


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$integration", ".*")


def test_the_dashboard_queries_are_valid_promql(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}", "expr": grafana_to_promql(expr)}
        for index, expr in enumerate(dashboard_queries())]}]}
    rules_file = tmp_path / "dashboard_queries.yml"
    rules_file.write_text(yaml.safe_dump(rules))

    run_promtool("check", "rules", str(rules_file))


@pytest.mark.django_db
def test_the_dashboard_and_the_rules_use_only_exported_metrics(client, settings):
    import django_prometheus.cache.metrics  # noqa: F401 - registered by the Redis backend only; a panel shows it

    settings.RESILIENCE_METRICS_TOKEN = ""
    families = list(text_string_to_metric_families(client.get("/metrics").content.decode()))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {family.name + suffix for family in families for suffix in suffixes.get(family.type, ("",))}
    exported |= {metrics_scrape.DEAD_LETTERS_METRIC, metrics_scrape.ALERTS_METRIC}  # once their models exist

    queries = dashboard_queries() + [rule["expr"] for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]
                                     for rule in group["rules"]]
    used = {name for query in queries for name in re.findall(r"\b((?:resilience|django)_[a-z_]+)\b", query)}
    assert used - exported == set()
