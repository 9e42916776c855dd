"""integrations.status: one read model of an integration's state, read in one round trip per page."""

import threading

import pytest
import redis

from conftest import count_round_trips
from integrations.models import Integration
from integrations.resilience import get_engine
from integrations.resilience.breaker import CLOSED, OPEN
from integrations.status import PROCESS, RECORDED, SHARED, read_statuses

pytestmark = pytest.mark.django_db


@pytest.fixture
def integrations():
    rows = [Integration.objects.create(name=f"svc-{n}", kind="external_api", hourly_limit=10, failure_threshold=2,
                                       minimum_calls=100, max_retries=0) for n in range(5)]
    return rows


def fail(name, times):
    from integrations.resilience import execute

    def down():
        raise ConnectionError("down")

    for _ in range(times):
        execute(name, down)


def test_statuses_say_what_callers_meet_in_the_order_asked(integrations):
    fail("svc-1", 2)
    fail("svc-2", 2)
    integrations[2].force_closed()
    statuses = read_statuses(integrations)
    assert [status.name for status in statuses] == [row.name for row in integrations]
    assert [status.own_state for status in statuses] == [CLOSED, OPEN, OPEN, CLOSED, CLOSED]
    assert [status.state for status in statuses] == [CLOSED, OPEN, CLOSED, CLOSED, CLOSED]  # forced closed wins
    assert statuses[1].quota.hourly_used == 2 and statuses[1].figures is not None
    assert statuses[1].to_dict()["state"] == OPEN and statuses[1].to_dict()["own_state"] == OPEN


def test_without_redis_the_scope_is_this_process(integrations, settings):
    from integrations.resilience import set_engine

    settings.RESILIENCE_REDIS_URL = ""
    set_engine(None)
    assert {status.scope for status in read_statuses(integrations)} == {PROCESS}


@pytest.fixture
def redis_engine(settings):
    from conftest import redis_url

    if not redis_url():
        pytest.skip("needs Redis: set REDIS_URL (the second run of .ci/run does)")
    from integrations.resilience import set_engine

    settings.RESILIENCE_REDIS_URL = redis_url()
    set_engine(None)
    yield get_engine()
    set_engine(None)


def test_a_page_of_statuses_costs_one_round_trip_on_redis(redis_engine, integrations, monkeypatch):
    fail("svc-3", 2)
    expected = [(redis_engine.store.snapshot(row.to_policy()).state, redis_engine.store.quota_usage(row.to_policy()))
                for row in integrations]
    sent = count_round_trips(monkeypatch)
    statuses = read_statuses(integrations, figures_minutes=None)
    monkeypatch.undo()
    assert len(sent) == 1  # every breaker and quota of the page in one pipeline
    assert [(status.own_state, status.quota) for status in statuses] == expected
    assert {status.scope for status in statuses} == {SHARED}


def test_a_redis_that_forgot_the_script_is_answered_after_loading_it(redis_engine, integrations):
    fail("svc-0", 2)
    redis_engine.store.client.script_flush()
    assert read_statuses(integrations[:1], figures_minutes=None)[0].own_state == OPEN


def test_a_process_that_makes_no_calls_reads_the_recorded_state_without_redis(integrations, settings):
    from django.utils import timezone

    from integrations.models import BreakerState
    from integrations.resilience import set_engine
    from monitoring.models import CallStats

    settings.RESILIENCE_REDIS_URL = ""
    set_engine(None)
    opened = timezone.now().replace(microsecond=0)
    # what other processes wrote: svc-1's breaker opened there, and 7 attempts this hour
    BreakerState.objects.create(integration=integrations[1], state=OPEN, opened_at=opened, changed_at=opened)
    CallStats.objects.create(integration=integrations[1], minute=opened.replace(second=0), calls=7, attempts=7,
                             successes=5, cache_hits=1, cache_misses=3)
    rows = Integration.objects.select_related("breaker_state").filter(pk__in=[row.pk for row in integrations])
    statuses = {status.name: status for status in read_statuses(rows.order_by("name"), calling_process=False)}
    assert {status.scope for status in statuses.values()} == {RECORDED}
    assert statuses["svc-1"].state == OPEN and statuses["svc-0"].state == CLOSED
    assert statuses["svc-1"].breaker.opened_at == opened.timestamp()
    assert (statuses["svc-1"].quota.hourly_used, statuses["svc-1"].quota.level) == (7, "healthy")
    assert statuses["svc-1"].cache == {"hits": 1, "misses": 3, "hit_ratio": 0.25, "source": "figures", "entries": 0,
                                       "average_age_s": None}  # none in this process's L1
    document = statuses["svc-1"].to_dict()
    assert document["opened_at"] == opened.isoformat() and document["scope"] == RECORDED
    # this process's own engine, which saw none of it, says closed: the calling process's reading
    assert read_statuses(rows.filter(name="svc-1"))[0].state == CLOSED


def test_the_admin_list_reads_every_rows_state_in_one_round_trip(redis_engine, integrations, admin_client,
                                                                  monkeypatch):
    sent = []
    real_send = redis.connection.AbstractConnection.send_packed_command
    serving = threading.get_ident()  # the page's thread: a store's flusher thread may write meanwhile

    def counting(self, command, check_health=True):
        if threading.get_ident() == serving and b"EVALSHA" in b"".join(
                command if isinstance(command, list) else [command]):
            sent.append(command)
        return real_send(self, command, check_health)

    def list_page():
        sent.clear()
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        response = admin_client.get("/admin/integrations/integration/")
        monkeypatch.undo()
        assert response.status_code == 200
        return len(sent)

    few = list_page()
    for n in range(5, 25):
        Integration.objects.create(name=f"svc-{n}", kind="external_api", hourly_limit=10)
    assert list_page() == few == 1  # breaker and quota columns of the whole page: one pipeline
