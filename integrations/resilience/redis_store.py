"""Shared state in Redis: one breaker, one quota and one rate limit for the whole fleet.

Every decision and every recorded outcome, with any transition it causes, is
one atomic Lua script (``state.lua``), so processes on many hosts behave as
one breaker: a trip happens exactly once, and half-open trial calls are
limited cluster-wide by expiring probe leases (a crashed process's lease
lapses after its attempt timeout).

Cost: at most one round trip per guarded call in the closed state. A process
that saw the breaker closed less than 0.5 s ago admits a first attempt on its
own; if the integration has a quota, the one round trip is a small script
that takes a unit atomically. Otherwise (a stale view, a retry, whose budget
is counted in Redis, a half-open or open breaker) ``acquire`` runs the full
state script. A fast success in the closed state is not sent on its own but
carried by the process's next state round trip (or by a flusher thread within
``flush_interval_s``). Failures, slow calls and half-open outcomes are
recorded at once, since they can move the breaker: a trip is decided in
Redis, exactly once.

A change by any process (a trip, an operator's reset, a saved policy's mode)
is seen by every other process within 1 s: what a process last saw of a
breaker is trusted for 0.5 s at most. A saved policy's mode is written to
Redis and used by the script at once; its other knobs are reloaded by a
process whose policy is older than the revision the script returns.

Outage: if Redis cannot be reached, calls go on with per-process state (a
LocalStore), with one warning per outage in the log and a SharedStateChanged
event; Redis is tried again every ``retry_interval_s`` and shared state
resumes by itself. No exception reaches a caller because Redis is down.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
import weakref
from pathlib import Path

import redis

from ..errors import ErrorCategory
from . import breaker as br
from .breaker import BreakerSnapshot, Transition
from .events import EventBus, SharedStateChanged
from .events import bus as default_bus
from .policy import MODE_FORCED_OPEN, MODE_NORMAL, Policy
from .quota import DAY, HOUR, QuotaUsage, window_start
from .state import FORCED_OPEN_REASON, OPEN_REASON, RETRY_BUDGET, LocalStore, Permit, RateLimit, StateStore

logger = logging.getLogger("integrations.shared_state")

_LUA_DIR = Path(__file__).with_name("lua")
_OUTCOME_CODES = {br.SUCCESS: "s", br.FAILURE: "f", br.IGNORED: "i"}
# Errors that mean "Redis is not there": anything else (a script error) is a bug and is raised.
_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# How long this process trusts what it last saw of a breaker (open: fail fast; closed:
# admit) without asking Redis, so a flood of calls costs no round trip each. Half the
# 1 s within which every process must see another's change (a trip, a reset, a mode).
_VIEW_TTL_S = 0.5


_SHARED_ADMITTED = Permit(True, shared=True)

# Rate-limit leases (see ``RedisStore.hit``). A lease is spent for at most _LEASE_TTL_S and
# holds at most _LEASE_MAX requests, and at most 1/_LEASE_SHARE of what the client has left;
# windows shorter than _LEASE_MIN_WINDOW_S are counted request by request.
_LEASE_TTL_S = 0.5
_LEASE_MAX = 100
_LEASE_SHARE = 16
_LEASE_MIN_WINDOW_S = 5.0
_NO_LEASE = ("", 0, 0)


class _Pending:
    """Fast successes of one integration not yet sent: they ride on the next round trip."""

    __slots__ = ("policy", "ok", "ok_retry", "since")

    def __init__(self, policy: Policy, since: float) -> None:
        self.policy = policy
        self.ok = 0
        self.ok_retry = 0
        self.since = since


class _Lease:
    """One client's rate-limit window as this process last saw it, and the lease it may spend.

    ``size`` requests were counted in Redis ahead (members ``<id>:1..size``); ``used`` of them
    have been spent. A record with ``size`` 0 holds no lease: it only remembers when the
    client was last counted, so a second request soon after marks the client as busy.
    """

    __slots__ = ("id", "size", "used", "limit", "window_s", "remaining", "reset_at", "synced", "until")

    def __init__(self, lease_id: str, size: int, limit: int, window_s: float, remaining: int, reset_at: float,
                 synced: float) -> None:
        self.id = lease_id
        self.size = size
        self.used = 0
        self.limit = limit
        self.window_s = window_s
        self.remaining = remaining  # what the client had left, this lease included, when it was granted
        self.reset_at = reset_at
        self.synced = synced  # monotonic
        self.until = synced + _LEASE_TTL_S

    def settlement(self) -> tuple[str, int, int]:
        return (self.id, self.size, self.used) if self.size else _NO_LEASE


class RedisStore(StateStore):
    shared = True

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis.Redis | None = None,
        prefix: str = "resilience",
        clock=None,
        bus: EventBus | None = None,
        retry_interval_s: float = 1.0,
        flush_interval_s: float = 0.5,
        socket_timeout_s: float = 0.5,
    ) -> None:
        self.local = LocalStore(clock)  # per-process state while Redis is away
        self.clock = self.local.clock
        self.client = client or redis.Redis.from_url(
            url, socket_connect_timeout=socket_timeout_s, socket_timeout=socket_timeout_s)
        self.prefix = prefix
        self.bus = bus or default_bus
        self.retry_interval_s = retry_interval_s
        self.flush_interval_s = flush_interval_s
        self._state_script = self.client.register_script((_LUA_DIR / "state.lua").read_text())
        self._rate_script = self.client.register_script((_LUA_DIR / "rate_limit.lua").read_text())
        self._quota_script = self.client.register_script((_LUA_DIR / "quota.lua").read_text())
        self.available = True
        self._retry_at = 0.0
        self._down_since = 0.0
        self._outage_lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._flusher_pid = 0
        self._seen_state: dict[str, str] = {}  # the breaker state each integration had at our last round trip
        self._open_until: dict[str, tuple[float, float]] = {}  # name -> (opened at, seen at), wall time
        self._closed_seen_at: dict[str, float | None] = {}  # name -> when last seen closed (monotonic)
        self._leases: dict[str, _Lease] = {}  # rate-limit key -> this process's view and lease
        self._unsettled: list[tuple[str, _Lease]] = []  # leases replaced before they were settled
        self._renewals: dict[str, threading.Event] = {}  # rate-limit key -> set when its renewal is done
        self.socket_timeout_s = socket_timeout_s
        self._lease_lock = threading.Lock()
        os.register_at_fork(after_in_child=functools.partial(_call_if_alive, weakref.WeakMethod(self._forget_leases)))

    # -- keys -------------------------------------------------------------------

    def _keys(self, policy: Policy, now: float) -> list[str]:
        # {name} is a hash tag: one integration's keys stay on one Redis Cluster slot
        base = f"{self.prefix}:{{{policy.name}}}"
        return [f"{base}:breaker", f"{base}:leases", f"{base}:quota:h:{window_start(now, HOUR)}",
                f"{base}:quota:d:{window_start(now, DAY)}"]

    def _args(self, op: str, policy: Policy, now: float, *, is_retry=False, pending=(0, 0), outcome="i",
              slow=False, trial=False, lease="", extra="", extra2="") -> list:
        budget = -1 if policy.retry_budget_percent is None else policy.retry_budget_percent
        return [
            op, repr(now), policy.mode, policy.failure_threshold, f"{policy.failure_rate_threshold:g}",
            f"{policy.slow_call_rate_threshold:g}", policy.window_size, policy.minimum_calls,
            repr(float(policy.reset_timeout_s)), policy.half_open_max_calls, policy.success_threshold, budget,
            -1 if policy.hourly_limit is None else policy.hourly_limit,
            -1 if policy.daily_limit is None else policy.daily_limit,
            lease, repr(policy.attempt_timeout_ms / 1000 + 1.0), self._key_ttl(policy), int(is_retry),
            pending[0], pending[1], outcome, int(slow), int(trial), extra, extra2,
        ]

    @staticmethod
    def _key_ttl(policy: Policy) -> int:
        # state idle this long is forgotten: a day, or longer than the breaker can stay open
        return int(max(DAY, policy.reset_timeout_s * 2))

    # -- the round trip, and what happens when it fails ----------------------------

    def _eval(self, keys: list[str], args: list):
        """Run the state script; None when Redis is unreachable (the caller goes local)."""
        if not self.available and time.monotonic() < self._retry_at:
            return None
        try:
            result = self._state_script(keys=keys, args=args)
        except _UNREACHABLE as exc:
            self._lost(exc)
            return None
        if not self.available:
            self._regained()
        return result

    def _lost(self, exc: Exception) -> None:
        with self._outage_lock:
            self._retry_at = time.monotonic() + self.retry_interval_s
            if not self.available:
                return
            self.available = False
            self._down_since = time.monotonic()
        logger.warning("shared state unavailable (%s: %s); breakers, quotas and rate limits are per process "
                       "until Redis is back", type(exc).__name__, exc)
        self.bus.publish(SharedStateChanged(shared=False, reason=str(exc), at=self.clock.time()))

    def _regained(self) -> None:
        with self._outage_lock:
            if self.available:
                return
            self.available = True
            outage = time.monotonic() - self._down_since
        logger.warning("shared state back after %.1f s; breakers, quotas and rate limits are shared again", outage)
        self.bus.publish(SharedStateChanged(shared=True, reason=f"back after {outage:.1f} s", at=self.clock.time()))

    # -- deferred successes -----------------------------------------------------------

    def _defer(self, policy: Policy, is_retry: bool) -> None:
        with self._pending_lock:
            pending = self._pending.get(policy.name)
            if pending is None:
                pending = self._pending[policy.name] = _Pending(policy, time.monotonic())
            pending.policy = policy
            if is_retry:
                pending.ok_retry += 1
            else:
                pending.ok += 1
        self._ensure_flusher()

    def _take_pending(self, name: str) -> tuple[int, int]:
        if not self._pending:
            return (0, 0)
        with self._pending_lock:
            pending = self._pending.pop(name, None)
        return (0, 0) if pending is None else (pending.ok, pending.ok_retry)

    def _ensure_flusher(self) -> None:
        if self._flusher_pid != os.getpid():
            self._start_flusher()

    def _start_flusher(self) -> None:
        with self._pending_lock:
            if self._flusher_pid == os.getpid():
                return
            self._flusher_pid = os.getpid()  # a forked child starts its own
            self._flusher = threading.Thread(target=self._flush_forever, name="shared-state-flusher", daemon=True)
            self._flusher.start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self.flush_interval_s)
            try:
                self.flush(older_than_s=self.flush_interval_s)
            except Exception:  # noqa: BLE001 - the flusher must outlive any one failure; it is logged
                logger.exception("flushing deferred outcomes to shared state failed")

    def flush(self, older_than_s: float = 0.0) -> None:
        """Send deferred successes now (those waiting at least ``older_than_s``), and settle
        rate-limit leases (all of them; with ``older_than_s``, those past their time)."""
        self._settle_leases(everything=older_than_s <= 0)
        now_mono = time.monotonic()
        with self._pending_lock:
            due = [p for p in self._pending.values() if now_mono - p.since >= older_than_s]
            for pending in due:
                del self._pending[pending.policy.name]
        for pending in due:
            now = self.clock.time()
            result = self._eval(self._keys(pending.policy, now),
                                self._args("f", pending.policy, now, pending=(pending.ok, pending.ok_retry)))
            if result is not None:
                self._observe(pending.policy.name, result)
                self._publish(_transitions(pending.policy.name, result[6:]))

    def _publish(self, transitions) -> None:
        from .events import StateTransition

        for transition in transitions:
            self.bus.publish(StateTransition(transition))

    def _observe(self, name: str, result) -> None:
        state, opened_at, mode = _text(result[2]), _text(result[3]), _text(result[5])
        # closed and not forced open fleet-wide: this process may admit on its own for a while
        self._closed_seen_at[name] = time.monotonic() if state == br.CLOSED and mode != MODE_FORCED_OPEN else None
        self._seen_state[name] = state
        if state == br.OPEN and opened_at:
            self._open_until[name] = (float(opened_at), self.clock.time())
        else:
            self._open_until.pop(name, None)

    def _seen_closed(self, policy: Policy, is_retry: bool) -> bool:
        """Whether this process saw the breaker closed within the view TTL (first attempts only).

        Such an attempt needs no breaker round trip; a retry always asks,
        since the retry budget is counted in Redis.
        """
        if is_retry:
            return False
        seen_at = self._closed_seen_at.get(policy.name)
        return seen_at is not None and time.monotonic() - seen_at < _VIEW_TTL_S

    def _take_quota(self, policy: Policy) -> Permit | None:
        """One unit of quota in one small script; None when Redis is unreachable."""
        _, _, hour_key, day_key = self._keys(policy, self.clock.time())
        try:
            full = self._quota_script(keys=[hour_key, day_key], args=[
                -1 if policy.hourly_limit is None else policy.hourly_limit,
                -1 if policy.daily_limit is None else policy.daily_limit])
        except _UNREACHABLE as exc:
            self._lost(exc)
            return None
        if full:
            return Permit(False, category=ErrorCategory.QUOTA_EXCEEDED, reason=f"{_text(full)} quota reached",
                          shared=True)
        return _SHARED_ADMITTED

    # -- the StateStore interface ------------------------------------------------------

    def refusal(self, policy: Policy) -> str | None:
        if not self.available:
            return self.local.refusal(policy)
        if policy.mode == MODE_FORCED_OPEN:
            return FORCED_OPEN_REASON
        seen = self._open_until.get(policy.name)
        if seen is None or policy.mode != MODE_NORMAL:
            return None
        opened_at, seen_at = seen
        now = self.clock.time()
        if now - seen_at < _VIEW_TTL_S and now - opened_at < policy.reset_timeout_s:
            return OPEN_REASON
        return None

    def acquire(self, policy: Policy, is_retry: bool = False) -> Permit:
        if self.available and self._seen_closed(policy, is_retry):
            if policy.hourly_limit is None and policy.daily_limit is None:
                return _SHARED_ADMITTED
            permit = self._take_quota(policy)
            if permit is not None:
                return permit
            return self.local.acquire(policy, is_retry)
        now = self.clock.time()
        lease = _unique_id()
        pending = self._take_pending(policy.name)
        result = self._eval(self._keys(policy, now),
                            self._args("a", policy, now, is_retry=is_retry, pending=pending, lease=lease))
        if result is None:
            return self.local.acquire(policy, is_retry)
        self._observe(policy.name, result)
        decision, reason, rev = int(result[0]), _text(result[1]), float(result[4])
        transitions = _transitions(policy.name, result[6:])
        if rev > policy.revision:
            self._stale_policy(policy)
        if decision == 0:
            if reason == "budget":
                return Permit(False, reason=RETRY_BUDGET, transitions=transitions, shared=True)
            if reason.startswith("quota:"):
                return Permit(False, category=ErrorCategory.QUOTA_EXCEEDED,
                              reason=f"{reason[6:]} quota reached", transitions=transitions, shared=True)
            return Permit(False, category=ErrorCategory.CIRCUIT_OPEN, reason=_refusal_text(reason, policy),
                          transitions=transitions, shared=True)
        return Permit(True, trial=decision == 2, transitions=transitions, shared=True, lease=lease)

    def record(self, policy: Policy, permit: Permit, outcome: str, slow: bool,
               is_retry: bool) -> tuple[Transition, ...]:
        if not permit.shared:
            return self.local.record(policy, permit, outcome, slow, is_retry)
        if outcome == br.SUCCESS and not slow and not permit.trial and \
                self._seen_state.get(policy.name) == br.CLOSED:
            self._defer(policy, is_retry)
            return ()
        if outcome == br.IGNORED and not permit.trial and not is_retry:
            return ()  # counts as neither, holds no lease nor budget: nothing to tell Redis
        now = self.clock.time()
        result = self._eval(self._keys(policy, now), self._args(
            "r", policy, now, is_retry=is_retry, pending=self._take_pending(policy.name),
            outcome=_OUTCOME_CODES[outcome], slow=slow, trial=permit.trial, lease=permit.lease))
        if result is None:
            return ()  # Redis left mid-call: this outcome goes with the outage
        self._observe(policy.name, result)
        return _transitions(policy.name, result[6:])

    def snapshot(self, policy: Policy) -> BreakerSnapshot:
        now = self.clock.time()
        result = self._eval(self._keys(policy, now),
                            self._args("s", policy, now, pending=self._take_pending(policy.name)))
        if result is None:
            local = self.local.snapshot(policy)
            local.extra["shared"] = False
            return local
        self._observe(policy.name, result)
        return _snapshot_from(policy, result)

    def _local_read(self, policy: Policy) -> tuple[BreakerSnapshot, QuotaUsage]:
        local = self.local.snapshot(policy)
        local.extra["shared"] = False
        return local, self.local.quota_usage(policy)

    def read_many(self, policies: list[Policy]) -> list[tuple[BreakerSnapshot, QuotaUsage]]:
        """Every policy's breaker and quota in one pipelined round trip (a page of the console)."""
        if not policies:
            return []
        if not self.available and time.monotonic() < self._retry_at:
            return [self._local_read(policy) for policy in policies]
        now = self.clock.time()
        calls = [(self._keys(policy, now), self._args("s", policy, now, pending=self._take_pending(policy.name)))
                 for policy in policies]
        for first_try in (True, False):
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(self._state_script.sha, len(keys), *keys, *args)
                pipe.mget(keys[2], keys[3])
            try:
                replies = pipe.execute(raise_on_error=False)
            except _UNREACHABLE as exc:
                self._lost(exc)
                return [self._local_read(policy) for policy in policies]
            if first_try and any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
                # a restarted Redis forgot the script, which therefore ran nowhere: load it, send again
                self.client.script_load(self._state_script.script)
                continue
            break
        failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
        if failed is not None:
            raise failed
        if not self.available:
            self._regained()
        reads = []
        for policy, result, (hourly, daily) in zip(policies, replies[0::2], replies[1::2]):
            self._observe(policy.name, result)
            reads.append((_snapshot_from(policy, result),
                          QuotaUsage(policy.name, int(hourly or 0), policy.hourly_limit, int(daily or 0),
                                     policy.daily_limit, window_start(now, HOUR) + HOUR,
                                     window_start(now, DAY) + DAY)))
        return reads

    def quota_usage(self, policy: Policy) -> QuotaUsage:
        now = self.clock.time()
        if self.available or time.monotonic() >= self._retry_at:
            _, _, hour_key, day_key = self._keys(policy, now)
            try:
                hourly, daily = self.client.mget(hour_key, day_key)
            except _UNREACHABLE as exc:
                self._lost(exc)
            else:
                if not self.available:
                    self._regained()
                return QuotaUsage(policy.name, int(hourly or 0), policy.hourly_limit, int(daily or 0),
                                  policy.daily_limit, window_start(now, HOUR) + HOUR, window_start(now, DAY) + DAY)
        return self.local.quota_usage(policy)

    def reset(self, policy: Policy, by: str | None = None, reason: str = "manual reset") -> Transition | None:
        self._take_pending(policy.name)  # the window is cleared: successes still waiting say nothing more
        local = self.local.reset(policy, by, reason)  # the per-process view too, for when Redis is away
        now = self.clock.time()
        result = self._eval(self._keys(policy, now), self._args("x", policy, now, extra=by or "", extra2=reason))
        if result is None:
            return local
        self._observe(policy.name, result)
        transitions = _transitions(policy.name, result[6:])
        return transitions[0] if transitions else None

    def publish_policy(self, policy: Policy) -> None:
        now = self.clock.time()
        self._eval(self._keys(policy, now), self._args("p", policy, now, extra=policy.mode,
                                                       extra2=repr(policy.revision)))

    def hit(self, key: str, limit: int, window_s: float) -> RateLimit:
        """Count one request in the fleet's window for ``key``: one round trip, or none on a lease.

        A client that is busy in this process (counted here again within a second) is given a
        lease: a few of its next requests counted in Redis ahead, which this process then admits
        on its own. Leases double while they are used up, to at most _LEASE_MAX, and are at most
        1/_LEASE_SHARE of what the client has left, so near the limit every request is counted
        in Redis one by one: the limit holds exactly for the fleet. A lease is settled (its spent
        requests counted again at that time, the unspent ones given back) by the client's next
        round trip or by the flusher within about a second. Meanwhile other processes see the
        unspent part as used: a client at the very end of its budget may be refused up to a
        second early. X-RateLimit-Remaining from a lease is what this process knows.
        """
        if not self.available and time.monotonic() < self._retry_at:
            return self.local.hit(key, limit, window_s)
        # One thread of the process renews a client's lease; the others wait for it rather than
        # all asking Redis at once (which is what a busy client's concurrent requests would do).
        for _ in range(2):
            with self._lease_lock:
                seen = self._leases.get(key)
                if seen is not None and seen.used < seen.size and time.monotonic() < seen.until \
                        and seen.limit == limit and seen.window_s == window_s:
                    seen.used += 1
                    return RateLimit(True, limit, max(seen.remaining - seen.used, 0), seen.reset_at)
                renewal = self._renewals.get(key)
                if renewal is None:
                    renewal = self._renewals[key] = threading.Event()
                    self._leases.pop(key, None)
                    break  # this thread renews
            renewal.wait(self.socket_timeout_s * 2)
        else:
            return self._count_in_redis(key, limit, window_s, None)  # still nothing to spend: no lease
        try:
            return self._count_in_redis(key, limit, window_s, seen)
        finally:
            with self._lease_lock:
                self._renewals.pop(key, None)
            renewal.set()

    def _count_in_redis(self, key: str, limit: int, window_s: float, seen: _Lease | None) -> RateLimit:
        """One round trip: this request counted, ``seen``'s lease settled, a new lease asked for if busy."""
        now_mono = time.monotonic()
        call_id = _unique_id()
        try:
            allowed, remaining, reset_at, granted = self._rate_script(
                keys=[self._rate_key(key)],
                args=[repr(self.clock.time()), repr(float(window_s)), limit, call_id, 1,
                      *(_NO_LEASE if seen is None else seen.settlement()), _lease_wanted(seen, window_s, now_mono),
                      _LEASE_SHARE])
        except _UNREACHABLE as exc:
            self._lost(exc)
            return self.local.hit(key, limit, window_s)
        if not self.available:
            self._regained()
        verdict = RateLimit(bool(int(allowed)), limit, int(remaining), float(reset_at))
        view = _Lease(call_id, int(granted), limit, float(window_s), verdict.remaining, verdict.reset_at, now_mono)
        with self._lease_lock:
            replaced = self._leases.get(key)
            self._leases[key] = view
            if replaced is not None and replaced.size:
                # counted at the same time by a thread that did not wait: its lease goes to the flusher
                self._unsettled.append((key, replaced))
        if view.size:
            self._ensure_flusher()
        return verdict

    def _rate_key(self, key: str) -> str:
        return f"{self.prefix}:ratelimit:{key}"

    def _settle_leases(self, everything: bool) -> None:
        """Settle leases past their time (or all): one pipelined round trip for all of them."""
        now_mono = time.monotonic()
        with self._lease_lock:
            due = [(key, view.window_s, view.limit, view.settlement()) for key, view in self._unsettled]
            self._unsettled = []
            for key, view in list(self._leases.items()):
                if not (everything or now_mono >= view.until):
                    continue
                if view.size:
                    due.append((key, view.window_s, view.limit, view.settlement()))
                    view.id, view.size = "", 0  # settled below; ``used`` stays, to tell how busy the client is
                if everything or now_mono - view.synced >= 2 * _LEASE_TTL_S:
                    del self._leases[key]  # not counted for a while: forgotten
        if not due or (not self.available and now_mono < self._retry_at):
            return
        now = repr(self.clock.time())
        pipe = self.client.pipeline(transaction=False)
        for key, window_s, limit, settlement in due:
            self._rate_script(keys=[self._rate_key(key)], client=pipe, args=[
                now, repr(window_s), limit, _unique_id(), 0, *settlement, 0, _LEASE_SHARE])
        try:
            pipe.execute()
        except _UNREACHABLE as exc:
            self._lost(exc)  # the leases' requests stay counted at the time they were leased

    def _forget_leases(self) -> None:
        # A forked child must not spend its parent's leases (both would spend the same requests).
        self._lease_lock = threading.Lock()
        self._leases = {}
        self._unsettled = []
        self._renewals = {}

    def _stale_policy(self, policy: Policy) -> None:
        if self.on_stale_policy is not None:
            self.on_stale_policy(policy.name)


def _snapshot_from(policy: Policy, result) -> BreakerSnapshot:
    """The state script's answer to a snapshot ("s"): its seventh item is the breaker hash's fields."""
    fields = result[6]
    values = dict(zip(map(_text, fields[0::2]), map(_text, fields[1::2])))
    return BreakerSnapshot(
        integration=policy.name, state=values["st"], mode=values["mode"],
        opened_at=_float_or_none(values["oa"]), changed_at=_float_or_none(values["ca"]),
        consecutive_failures=int(values["cf"]), consecutive_successes=int(values["cs"]),
        half_open_in_flight=int(values["leases"]), window_calls=int(values["cnt"]),
        window_failures=int(values["nf"]), window_slow=int(values["ns"]), window_retries=int(values["nr"]),
        extra={"shared": True},
    )


def _lease_wanted(seen: _Lease | None, window_s: float, now_mono: float) -> int:
    """How big a lease to ask for: none for a client not counted here within the last second,
    else twice what the last one spent (at least 2, at most _LEASE_MAX)."""
    if seen is None or window_s < _LEASE_MIN_WINDOW_S or now_mono - seen.synced >= 2 * _LEASE_TTL_S:
        return 0
    return min(_LEASE_MAX, max(2, 2 * seen.used))


def _call_if_alive(method: weakref.WeakMethod) -> None:
    bound = method()
    if bound is not None:
        bound()


def _unique_id() -> str:
    # Random, not host:pid:counter: two stores in one process, or one inherited across a
    # fork, would reuse such names and a lease or a counted request would overwrite another.
    return uuid.uuid4().hex


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float_or_none(value: str) -> float | None:
    return float(value) if value else None


def _transitions(name: str, flat) -> tuple[Transition, ...]:
    if not flat or not isinstance(flat[0], (bytes, str)):
        return ()
    items = [_text(v) for v in flat]
    return tuple(
        Transition(name, items[i], items[i + 1], items[i + 2], float(items[i + 3]), items[i + 4] or None)
        for i in range(0, len(items) - 4, 5)
    )


def _refusal_text(reason: str, policy: Policy) -> str:
    if reason == "forced":
        return FORCED_OPEN_REASON
    if reason == "half_open":
        return f"breaker half-open: {policy.half_open_max_calls} trial call(s) already in flight"
    return OPEN_REASON

