"""Adaptive concurrency (issue 15, item 5): bulkhead_mode="adaptive" sets the bulkhead's limit by
AIMD on the upstream's latency, between 1 and max_concurrent, per process; the limit is shown in
the status read model (API, admin, CLI) and exported as resilience_concurrency_limit."""

import threading

import pytest

from integrations.errors import ErrorCategory
from integrations.resilience import execute
from integrations.resilience.bulkhead import AdaptiveLimit


def test_the_limit_starts_at_the_maximum_and_a_slow_sample_lowers_it_by_a_tenth():
    limit = AdaptiveLimit(20)
    assert limit.limit == 20
    limit.sample(dropped=True, in_flight=0)
    assert (limit.value, limit.limit) == (18.0, 18)


def test_it_never_falls_below_one():
    limit = AdaptiveLimit(4)
    for _ in range(100):
        limit.sample(dropped=True, in_flight=0)
    assert limit.limit == 1


def test_a_fast_sample_raises_it_by_one_only_under_load_and_never_past_the_maximum():
    limit = AdaptiveLimit(10)
    for _ in range(10):
        limit.sample(dropped=True, in_flight=0)
    low = limit.value
    limit.sample(dropped=False, in_flight=0)  # idle: says nothing about what more concurrency would do
    assert limit.value == low
    for _ in range(50):
        limit.sample(dropped=False, in_flight=limit.limit)
    assert limit.limit == 10


def test_a_saved_max_concurrent_caps_the_limit():
    limit = AdaptiveLimit(20)
    limit.cap(5)
    assert (limit.maximum, limit.limit) == (5, 5)


def test_slow_attempts_lower_the_limit_and_the_bulkhead_sheds_past_it(make_engine, clock, upstream):
    engine = make_engine(bulkhead_mode="adaptive", max_concurrent=8, slow_call_ms=100, max_retries=0,
                         failure_threshold=1000, slow_call_rate_threshold=0, failure_rate_threshold=0)
    slow = upstream("ok", clock=clock, takes=0.5)
    for _ in range(30):
        assert execute("svc", slow).ok
    assert engine.concurrency_limit("svc") == 1

    entered, release = threading.Event(), threading.Event()

    def held():
        entered.set()
        release.wait(10)
        return "held"

    results = []
    worker = threading.Thread(target=lambda: results.append(execute("svc", held)))
    worker.start()
    assert entered.wait(10)
    try:
        refused = execute("svc", lambda: "second")
    finally:
        release.set()
        worker.join(10)
    assert refused.error.category is ErrorCategory.BULKHEAD_FULL
    assert results[0].value == "held"


def test_timeouts_lower_the_limit_too(make_engine):
    engine = make_engine(bulkhead_mode="adaptive", max_concurrent=10, max_retries=0, failure_threshold=1000,
                         failure_rate_threshold=0)
    for _ in range(3):
        execute("svc", lambda: (_ for _ in ()).throw(TimeoutError("upstream slow")))
    assert engine.concurrency_limit("svc") == 7  # 10 x 0.9^3 = 7.29


def test_fixed_mode_keeps_max_concurrent_and_leaving_adaptive_mode_restores_it(make_engine, clock, upstream):
    engine = make_engine(bulkhead_mode="adaptive", max_concurrent=6, slow_call_ms=100)
    for _ in range(5):
        execute("svc", upstream("ok", clock=clock, takes=0.5))
    assert engine.concurrency_limit("svc") < 6
    make_engine(bulkhead_mode="fixed", max_concurrent=6)
    execute("svc", upstream("ok"))
    assert engine.concurrency_limit("svc") == 6


@pytest.mark.django_db
def test_the_status_the_api_and_the_metrics_show_the_limit(admin_client, clock, upstream):
    from integrations.models import Integration
    from integrations.resilience import get_engine
    from integrations.status import read_statuses

    Integration.objects.create(name="adaptive", bulkhead_mode="adaptive", max_concurrent=12, slow_call_ms=1,
                               timeout_enforcement="inline", max_retries=0)
    import time

    execute("adaptive", lambda: time.sleep(0.01))  # slower than 1 ms: the limit falls to 10
    limit = get_engine().concurrency_limit("adaptive")
    assert limit == 10

    (status,) = read_statuses(Integration.objects.filter(name="adaptive"))
    assert status.to_dict()["concurrency"] == {"mode": "adaptive", "limit": 10, "max": 12}
    body = admin_client.get("/api/integrations/adaptive/").json()
    assert body["concurrency"] == {"mode": "adaptive", "limit": 10, "max": 12}
    from monitoring.metrics_scrape import integration_families

    (family,) = [f for f in integration_families() if f.name == "resilience_concurrency_limit"]
    assert [(s.labels, s.value) for s in family.samples] == [({"integration": "adaptive", "mode": "adaptive"}, 10)]
