import random
import uuid

import pytest
import redis
from django.conf import settings
from django.core.cache import caches

from integrations.resilience import Engine, Policy, set_engine, use_engine
from integrations.resilience.cache import ResponseCache
from integrations.resilience.clock import FakeClock
from integrations.resilience.events import EventBus
from integrations.resilience.redis_store import RedisStore
from integrations.resilience.registry import PolicyRegistry
from integrations.resilience.state import LocalStore


def pytest_configure(config):
    # No background flusher of call statistics inside the test process: it would write
    # from another thread while tests hold the database; tests flush explicitly.
    settings.RESILIENCE_STATS_FLUSH_S = 0


@pytest.fixture(autouse=True)
def fresh_default_engine(settings):
    """Every test starts with a new process engine and its own shared-state keys: nothing leaks between tests."""
    settings.RESILIENCE_KEY_PREFIX = f"test-{uuid.uuid4().hex[:12]}"
    set_engine(None)
    yield
    set_engine(None)
    if redis_url():
        client = redis.Redis.from_url(redis_url())
        keys = list(client.scan_iter(f"{settings.RESILIENCE_KEY_PREFIX}:*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(autouse=True)
def dlq_spool_dir(settings, tmp_path, monkeypatch):
    """Each test spools refused dead letters into a directory of its own (never the project's var/)."""
    from integrations.dlq import spool

    settings.RESILIENCE_DLQ_SPOOL_DIR = str(tmp_path / "dlq-spool")
    monkeypatch.setattr(spool, "_spooled_here", False)
    return tmp_path / "dlq-spool"


@pytest.fixture(autouse=True)
def fresh_watchdog_sums(monkeypatch):
    """The watchdog keeps today's earlier hours' sums per process: none survives from another test's data."""
    from monitoring import watchdog

    monkeypatch.setattr(watchdog, "_completed_hours", {"key": None, "sums": {}})


@pytest.fixture
def empty_stats_buffer():
    """This process's buffered call statistics, emptied before and after: calls of other tests
    must not land in this test's rows (a watchdog run or a flush writes the buffer)."""
    from monitoring import stats

    stats.buffer.drain()
    yield
    stats.buffer.drain()


@pytest.fixture(autouse=True)
def clean_cache():
    cache = caches["default"]
    if hasattr(cache, "delete_pattern"):  # django-redis: only our keys, not the whole Redis database
        cache.delete_pattern("resilience:*")
    else:
        cache.clear()
    yield


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def bus():
    return EventBus()


@pytest.fixture
def store_kind(request):
    """Which state store make_engine uses: "local" unless a module parametrizes it (indirect)."""
    return getattr(request, "param", "local")


def redis_url():
    """The real Redis of this run (REDIS_URL), whatever a test sets RESILIENCE_REDIS_URL to."""
    from resilience_site import settings as site_settings

    return site_settings.RESILIENCE_REDIS_URL


@pytest.fixture
def state_store(store_kind, clock, bus):
    if store_kind == "local":
        yield LocalStore(clock)
        return
    if not redis_url():
        pytest.skip("needs Redis: set REDIS_URL (the second run of .ci/run does)")
    store = RedisStore(redis_url(), prefix=f"test-{uuid.uuid4().hex[:12]}", clock=clock, bus=bus)
    yield store
    keys = list(store.client.scan_iter(f"{store.prefix}:*"))
    if keys:
        store.client.delete(*keys)


@pytest.fixture
def make_engine(clock, bus, state_store):
    """An engine on a FakeClock and a seeded random source, with policies given directly.

    ``make_engine(name="svc", **knobs)`` registers that policy and installs the
    engine as the process engine, so ``execute()`` uses it too. Attempts run
    inline by default: these tests drive time themselves. The store is the
    per-process one, or the Redis one where a module parametrizes store_kind.
    """
    registry = PolicyRegistry()
    engine = Engine(registry=registry, store=state_store, cache=ResponseCache(), clock=clock,
                    rng=random.Random(7), bus=bus)
    contexts = []

    def build(name="svc", **knobs):
        knobs.setdefault("timeout_enforcement", "inline")
        registry.put(Policy(name=name, **knobs))
        if not contexts:
            context = use_engine(engine)
            context.__enter__()
            contexts.append(context)
        return engine

    yield build
    for context in contexts:
        context.__exit__(None, None, None)


class Upstream:
    """A scripted operation: each call pops the next step (a value, or an exception to raise)."""

    def __init__(self, *steps, clock=None, takes=0.0, name="upstream"):
        # a callable object names itself, as a function would, so its calls can be cached by arguments
        self.__qualname__ = name
        self.__module__ = "tests"
        self.steps = list(steps)
        self.calls = 0
        self.clock = clock
        self.takes = takes

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.clock is not None and self.takes:
            self.clock.advance(self.takes)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, BaseException) or (isinstance(step, type) and issubclass(step, BaseException)):
            raise step
        return step


@pytest.fixture
def upstream():
    return Upstream


def count_round_trips(monkeypatch) -> list:
    """The commands every Redis connection sends from now on (one entry a round trip: a pipeline is one)."""
    sent = []
    real_send = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sent.append(command)
        return real_send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sent


def pytest_generate_tests(metafunc):
    """A module with ``STORE_KINDS = ["local", "redis"]`` runs each engine test on each store."""
    kinds = getattr(metafunc.module, "STORE_KINDS", None)
    if kinds and "store_kind" in metafunc.fixturenames:
        metafunc.parametrize("store_kind", kinds, indirect=True)


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium (tests/browser_support.py), quit at the end of the test."""
    from browser_support import start_chromium

    driver = start_chromium(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()
