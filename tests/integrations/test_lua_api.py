"""integrations.resilience.lua_api: the scripts' layout, named the same in Python and in Lua, and
their real replies decoded by name; busy guarded calls on a shared breaker with a quota cost a few EVALSHAs (leases).

The layout tests read the .lua files; the others run the scripts on the real Redis, each test
under its own key prefix.
"""

import re
import threading
import uuid

import pytest
import redis
from redis.crc import key_slot

from integrations.resilience import Engine, Policy
from integrations.resilience import lua_api
from integrations.resilience.breaker import CLOSED, FAILURE, HALF_OPEN, OPEN, BreakerSnapshot
from integrations.resilience.clock import FakeClock
from integrations.resilience.events import EventBus
from integrations.resilience.leases import NO_SETTLEMENT
from integrations.resilience.redis_store import RedisStore
from integrations.resilience.registry import PolicyRegistry

from conftest import redis_url

NEEDS_REDIS = pytest.mark.skipif(not redis_url(), reason="needs Redis: set REDIS_URL (the second run of .ci/run does)")


# -- one layout, in both languages ------------------------------------------------------------


def script(name):
    return (lua_api.LUA_DIR / f"{name}.lua").read_text()


def arg_names(text):
    """The names the script reads ARGV by, in order (its ``local ARG_NAMES = {...}``)."""
    (names,) = re.findall(r"local ARG_NAMES = \{(.*?)\}", text, re.S)
    return tuple(re.findall(r"'(\w+)'", names))


def documented(text, section):
    """The positions and names a script's comment block lists under ``-- <section>``."""
    block = re.search(rf"^-- {section}\b.*?\n((?:--\s+\d+ \w+.*\n|--\s{{4,}}.*\n)+)", text, re.M)
    return re.findall(r"^--\s+(\d+) (\w+)", block.group(1), re.M)


def positions(names):
    return [(str(i), name) for i, name in enumerate(names, 1)]


@pytest.mark.parametrize(("name", "keys", "args"), [
    ("state", lua_api.STATE_KEYS, lua_api.STATE_ARGV),
    ("quota", lua_api.QUOTA_KEYS, lua_api.QUOTA_ARGV),
    ("rate_limit", lua_api.RATE_LIMIT_KEYS, lua_api.RATE_LIMIT_ARGV),
])
def test_each_script_reads_its_arguments_by_the_names_and_in_the_order_python_sends(name, keys, args):
    text = script(name)
    assert arg_names(text) == args
    assert documented(text, "ARGV") == positions(args)
    assert documented(text, "KEYS") == positions(keys)


@pytest.mark.parametrize(("name", "reply"), [("state", lua_api.STATE_REPLY), ("quota", lua_api.QUOTA_REPLY),
                                             ("rate_limit", lua_api.RATE_LIMIT_REPLY)])
def test_each_script_documents_the_reply_python_decodes(name, reply):
    assert documented(script(name), "Reply") == positions(reply)


def test_the_state_script_documents_its_ops_transitions_and_counts_as_python_names_them():
    text = script("state")
    assert re.search(r"^--\s+1 op\s+(.*)$", text, re.M).group(1).split(" | ") == list(lua_api.OPS)
    assert set(re.findall(r"(\w+) = true", re.search(r"local OPS = \{(.*?)\}", text).group(1))) == set(lua_api.OPS)
    assert re.search(r"a list of \{(.*?)\}", text).group(1).split(", ") == list(lua_api.TRANSITION)
    counts = re.search(r"8 counts\s+snapshot: \{(.*?)\}", text, re.S).group(1)
    assert re.findall(r"\w+", counts) == list(lua_api.BREAKER_COUNTS)
    # the counts are BreakerSnapshot's own fields, so a snapshot is built from them by name
    assert set(lua_api.BREAKER_COUNTS) <= set(BreakerSnapshot.__dataclass_fields__)


def test_arguments_are_built_from_exactly_the_layouts_names():
    built = lua_api.state_argv(lua_api.RECORD, Policy(name="svc"), 1.5, outcome=FAILURE, by="ops")
    assert len(built) == len(lua_api.STATE_ARGV)
    named = dict(zip(lua_api.STATE_ARGV, built))
    assert (named["op"], named["now"], named["outcome"], named["by"], named["hourly_limit"]) == \
        ("record", "1.5", "failure", "ops", -1)
    with pytest.raises(ValueError, match=r"extra \['surplus'\], missing \[\]"):
        lua_api.argv(("a",), {"a": 1, "surplus": 2})
    with pytest.raises(KeyError):
        lua_api.argv(("a", "b"), {"a": 1, "c": 2})


def test_one_integrations_keys_share_one_hash_slot():
    keys = lua_api.state_keys("resilience", "svc:eu", 1_700_000_000.0)
    assert len(keys) == len(lua_api.STATE_KEYS)
    assert len({key_slot(key.encode()) for key in keys}) == 1
    assert lua_api.quota_keys("resilience", "svc:eu", 1_700_000_000.0) == keys[-2:]


# -- real replies, decoded by name ---------------------------------------------------------------


@pytest.fixture
def redis_client():
    if not redis_url():
        pytest.skip("needs Redis: set REDIS_URL (the second run of .ci/run does)")
    client = redis.Redis.from_url(redis_url())
    prefix = f"test-lua-{uuid.uuid4().hex[:12]}"
    yield client, prefix
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def state_call(client, prefix, op, policy, now, **call):
    reply = lua_api.load(client, "state")(keys=lua_api.state_keys(prefix, policy.name, now),
                                          args=lua_api.state_argv(op, policy, now, **call))
    return lua_api.decode_state(policy.name, reply)


def test_the_state_scripts_replies_decode_into_named_fields(redis_client):
    client, prefix = redis_client
    policy = Policy(name="svc", failure_threshold=2, reset_timeout_s=30, minimum_calls=100, revision=3.0)
    now = 1_700_000_000.0
    first = state_call(client, prefix, lua_api.ACQUIRE, policy, now, lease="a")
    assert (first.decision, first.reason, first.state, first.opened_at, first.transitions, first.counts) == \
        (lua_api.ADMIT, "", CLOSED, None, (), {})
    state_call(client, prefix, lua_api.RECORD, policy, now, outcome=FAILURE)
    tripped = state_call(client, prefix, lua_api.RECORD, policy, now + 1, outcome=FAILURE)
    (trip,) = tripped.transitions
    assert (trip.integration, trip.from_state, trip.to_state, trip.reason, trip.at, trip.by) == \
        ("svc", CLOSED, OPEN, "2 consecutive failures", now + 1, None)
    assert (tripped.state, tripped.opened_at) == (OPEN, now + 1)

    refused = state_call(client, prefix, lua_api.ACQUIRE, policy, now + 2, lease="b")
    assert (refused.decision, refused.reason) == (lua_api.REFUSE, "open")
    trial = state_call(client, prefix, lua_api.ACQUIRE, policy, now + 40, lease="c")
    assert (trial.decision, [(t.from_state, t.to_state) for t in trial.transitions]) == \
        (lua_api.TRIAL, [(OPEN, HALF_OPEN)])

    snapshot = state_call(client, prefix, lua_api.SNAPSHOT, policy, now + 41, deferred=(0, 0, now + 41))
    assert snapshot.counts == {"changed_at": now + 40, "consecutive_failures": 0, "consecutive_successes": 0,
                               "half_open_in_flight": 1, "window_calls": 0, "window_failures": 0, "window_slow": 0,
                               "window_retries": 0}
    reset = state_call(client, prefix, lua_api.RESET, policy, now + 42, by="operator", reason="fixed upstream")
    assert [(t.to_state, t.reason, t.by) for t in reset.transitions] == [(CLOSED, "fixed upstream", "operator")]

    published = state_call(client, prefix, lua_api.PUBLISH, Policy(name="svc", mode="forced_open", revision=7.0),
                           now + 43)
    assert (published.mode, published.revision) == ("forced_open", 7.0)
    deferred = state_call(client, prefix, lua_api.FLUSH, policy, now + 44, deferred=(2, 1, now + 44))
    assert deferred.mode == "forced_open"  # the published mode wins over the caller's
    counted = state_call(client, prefix, lua_api.SNAPSHOT, policy, now + 45)
    assert (counted.counts["window_calls"], counted.counts["window_retries"]) == (3, 1)


def test_the_state_script_refuses_an_unknown_op_or_a_wrong_argument_count_before_touching_anything(redis_client):
    client, prefix = redis_client
    policy = Policy(name="svc")
    keys = lua_api.state_keys(prefix, "svc", 1.0)
    args = lua_api.state_argv(lua_api.FLUSH, policy, 1.0, deferred=(5, 0, 1.0))
    with pytest.raises(redis.exceptions.ResponseError, match="state.lua has no op trip"):
        lua_api.load(client, "state")(keys=keys, args=["trip", *args[1:]])
    with pytest.raises(redis.exceptions.ResponseError, match="state.lua takes 28 arguments, got 27"):
        lua_api.load(client, "state")(keys=keys, args=args[:-1])
    assert client.exists(*keys) == 0


def test_the_quota_and_rate_limit_scripts_replies_decode_into_named_fields(redis_client):
    client, prefix = redis_client
    policy = Policy(name="svc", hourly_limit=1)
    quota = lua_api.load(client, "quota")
    keys = lua_api.quota_keys(prefix, "svc", 1_700_000_000.0)
    assert [lua_api.decode_quota(quota(keys=keys, args=lua_api.quota_argv(policy.hourly_limit, policy.daily_limit)))
            for _ in range(2)] == [lua_api.QuotaReply(None, 0), lua_api.QuotaReply("hourly", 0)]

    rate_limit = lua_api.load(client, "rate_limit")
    key = [lua_api.rate_limit_key(prefix, "client")]
    first = lua_api.decode_rate_limit(rate_limit(keys=key, args=lua_api.rate_limit_argv(
        100.0, 60, 40, "one", True, NO_SETTLEMENT, 4, 4)))
    assert first == lua_api.RateLimitReply(allowed=True, remaining=39, reset_at=160.0, granted=4)
    settled = lua_api.decode_rate_limit(rate_limit(keys=key, args=lua_api.rate_limit_argv(
        101.0, 60, 40, "two", False, ("one", 4, 1), 0, 4)))
    assert settled == lua_api.RateLimitReply(allowed=False, remaining=38, reset_at=160.0, granted=0)


# -- the hot path: one round trip --------------------------------------------------------------


def commands_sent_by_this_thread(monkeypatch) -> list[bytes]:
    """The Redis commands this thread sends from now on (not the flusher thread's, which sends the
    deferred successes), until ``monkeypatch.undo()``."""
    sent = []
    real_send = redis.connection.AbstractConnection.send_packed_command
    caller = threading.get_ident()

    def counting(self, command, check_health=True):
        if threading.get_ident() == caller:
            sent.append(b"".join(command if isinstance(command, list) else [command]))
        return real_send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sent


@NEEDS_REDIS
def test_busy_guarded_calls_on_a_shared_breaker_with_a_quota_take_it_from_leases_in_few_evalshas(monkeypatch):
    registry = PolicyRegistry()
    registry.put(Policy(name="metered", timeout_enforcement="inline", hourly_limit=10**6, daily_limit=10**6))
    bus = EventBus()
    store = RedisStore(redis_url(), prefix=f"test-lua-{uuid.uuid4().hex[:12]}", bus=bus)
    engine = Engine(registry=registry, store=store, bus=bus)
    # the first call sees the breaker (the full state script), the second loads the quota script
    assert engine.execute("metered", lambda: 1).ok and engine.execute("metered", lambda: 1).ok
    sent = commands_sent_by_this_thread(monkeypatch)
    calls = 200
    assert all(engine.execute("metered", lambda: 1).ok for _ in range(calls))
    monkeypatch.undo()
    try:
        assert 0 < len(sent) <= calls * 0.05 and all(b"EVALSHA" in command for command in sent)
        store.settle_quota_leases(everything=True)  # the unspent units go back: the count is what was spent
        assert store.quota_usage(registry.get("metered")).hourly_used == calls + 2
    finally:
        keys = list(store.client.scan_iter(f"{store.prefix}:*"))
        if keys:
            store.client.delete(*keys)


@NEEDS_REDIS
def test_busy_calls_on_a_shared_time_window_send_their_successes_once_a_bucket(monkeypatch):
    clock = FakeClock()
    registry = PolicyRegistry()
    policy = Policy(name="timed", timeout_enforcement="inline", window_type="time", window_duration_s=60)
    registry.put(policy)
    bus = EventBus()
    store = RedisStore(redis_url(), prefix=f"test-lua-{uuid.uuid4().hex[:12]}", bus=bus, clock=clock)
    engine = Engine(registry=registry, store=store, bus=bus)
    assert engine.execute("timed", lambda: 1).ok  # the first call sees the breaker
    sent = commands_sent_by_this_thread(monkeypatch)
    calls = 1000
    for _ in range(calls):  # 10 s of the store's clock: 10 one-second buckets
        clock.advance(0.01)
        assert engine.execute("timed", lambda: 1).ok
    monkeypatch.undo()
    try:
        # the first success of each new bucket goes at once with the last bucket's; the rest ride along
        assert 9 <= len(sent) <= calls * 0.05 and all(b"EVALSHA" in command for command in sent)
        store.flush()
        assert store.snapshot(policy).window_calls == calls + 1  # every success counted, once
    finally:
        keys = list(store.client.scan_iter(f"{store.prefix}:*"))
        if keys:
            store.client.delete(*keys)
