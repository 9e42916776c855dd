"""Shared state in Redis: one breaker and one quota for the whole fleet.

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
``flush_interval_s``); with a time window, the successes carried together
are of one of its buckets (the first success of a later bucket is sent at
once, with them). Failures, slow calls and half-open outcomes are
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

The store's Redis client, its outages and its flusher thread are a RedisLink
(redis_link.py), which the inbound rate limiter the store hands out
(``rate_limiter``, a rate_limit.RedisRateLimiter) shares. The scripts' keys,
arguments and replies are built and decoded by name in lua_api.py.
"""

from __future__ import annotations

import atexit
import functools
import threading
import time
import weakref

import redis

from ..errors import ErrorCategory
from . import breaker as br
from . import lua_api
from .breaker import BreakerSnapshot, Transition
from .events import EventBus
from .events import bus as default_bus
from .policy import MODE_FORCED_OPEN, MODE_NORMAL, Policy
from .leases import LEASE_SHARE, Grant, Lease, LeaseBook, Settlement, call_if_alive
from .lua_api import ACQUIRE, FLUSH, PUBLISH, RECORD, REFUSE, RESET, SNAPSHOT, TRIAL, StateReply
from .quota import DAY, HOUR, QuotaUsage, window_start
from .rate_limit import RedisRateLimiter
from .redis_link import UNREACHABLE, RedisLink, unique_id
from .state import FORCED_OPEN_REASON, OPEN_REASON, RETRY_BUDGET, LocalStore, Permit, StateStore

# How long this process trusts what it last saw of a breaker (open: fail fast; closed:
# admit) without asking Redis, so a flood of calls costs no round trip each. Half the
# 1 s within which every process must see another's change (a trip, a reset, a mode).
_VIEW_TTL_S = 0.5


_SHARED_ADMITTED = Permit(True, shared=True)
_NO_GRANT = Grant("", 0, 0, 0.0)


def _from_quota_lease(lease: Lease) -> Permit:
    return _SHARED_ADMITTED


_NOTHING_DEFERRED = (0, 0, 0.0)


class _Pending:
    """Fast successes of one integration not yet sent: they ride on the next round trip.

    With a time window they are all of one of its buckets (``bucket``; ``at``, the wall time of
    the first), so Redis counts them in the bucket they belong to.
    """

    __slots__ = ("policy", "ok", "ok_retry", "since", "at", "bucket")

    def __init__(self, policy: Policy, since: float, at: float, bucket: int) -> None:
        self.policy = policy
        self.ok = 0
        self.ok_retry = 0
        self.since = since
        self.at = at
        self.bucket = bucket

    @property
    def deferred(self) -> tuple[int, int, float]:
        """state.lua's deferred arguments (lua_api.state_argv's ``deferred``)."""
        return (self.ok, self.ok_retry, self.at)


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
        self.bus = bus or default_bus
        self.link = RedisLink(url, client=client, clock=self.clock, bus=self.bus,
                              retry_interval_s=retry_interval_s, flush_interval_s=flush_interval_s,
                              socket_timeout_s=socket_timeout_s)
        self.client = self.link.client
        self.prefix = prefix
        self.flush_interval_s = flush_interval_s
        self._state_script = lua_api.load(self.client, "state")
        self._quota_script = lua_api.load(self.client, "quota")
        self._pending: dict[str, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._seen_state: dict[str, str] = {}  # the breaker state each integration had at our last round trip
        self._open_until: dict[str, tuple[float, float]] = {}  # name -> (opened at, seen at), wall time
        self._closed_seen_at: dict[str, float | None] = {}  # name -> when last seen closed (monotonic)
        self.link.on_flush(self._flush_due)
        # units of quota taken ahead (leases.py): a busy integration's calls cost no round trip each
        self.quota_leases = LeaseBook(wait_s=socket_timeout_s * 2)
        self.link.on_flush(self.settle_quota_leases)
        atexit.register(call_if_alive, weakref.WeakMethod(self.settle_quota_leases), True)
        # inbound rate limits in the same Redis, through the same link (one client, one outage)
        self.rate_limiter = RedisRateLimiter(self.link, prefix, self.local.rate_limiter)

    @property
    def available(self) -> bool:
        """Whether Redis answered the last round trip (False: per-process state until it is back)."""
        return self.link.available

    # -- the round trip -------------------------------------------------------------

    def _run(self, op: str, policy: Policy, **call) -> StateReply | None:
        """One state.lua round trip (``op`` on ``policy``'s breaker, lua_api.state_argv's ``call``
        arguments), decoded and observed; None when Redis is unreachable (the caller goes local)."""
        now = self.clock.time()
        reply = self.link.call(self._state_script, keys=lua_api.state_keys(self.prefix, policy.name, now),
                               args=lua_api.state_argv(op, policy, now, **call))
        if reply is None:
            return None
        decoded = lua_api.decode_state(policy.name, reply)
        self._observe(policy.name, decoded)
        return decoded

    # -- deferred successes -----------------------------------------------------------

    def _defer(self, policy: Policy, is_retry: bool) -> bool:
        """Keep a fast success for a later round trip; False when it must be sent now instead.

        That is when a time window's successes of an earlier bucket are waiting: they go with it
        (at most one round trip a bucket, per process and integration), so none is counted in a
        bucket it does not belong to.
        """
        duration = policy.time_window_s
        at = self.clock.time() if duration else 0.0
        bucket = br.bucket_number(duration, at) if duration else 0
        with self._pending_lock:
            pending = self._pending.get(policy.name)
            if pending is None:
                pending = self._pending[policy.name] = _Pending(policy, time.monotonic(), at, bucket)
            elif pending.bucket != bucket:
                return False
            pending.policy = policy
            if is_retry:
                pending.ok_retry += 1
            else:
                pending.ok += 1
        self.link.ensure_flusher()
        return True

    def _take_pending(self, name: str) -> tuple[int, int, float]:
        if not self._pending:
            return _NOTHING_DEFERRED
        with self._pending_lock:
            pending = self._pending.pop(name, None)
        return _NOTHING_DEFERRED if pending is None else pending.deferred

    def _flush_due(self) -> None:
        """What the link's flusher thread does: send the successes deferred at least one interval."""
        self.flush(older_than_s=self.flush_interval_s)

    def flush(self, older_than_s: float = 0.0) -> None:
        """Send deferred successes now (those waiting at least ``older_than_s``)."""
        now_mono = time.monotonic()
        with self._pending_lock:
            due = [p for p in self._pending.values() if now_mono - p.since >= older_than_s]
            for pending in due:
                del self._pending[pending.policy.name]
        for pending in due:
            reply = self._run(FLUSH, pending.policy, deferred=pending.deferred)
            if reply is not None:
                self._publish(reply.transitions)

    def _publish(self, transitions) -> None:
        from .events import StateTransition

        for transition in transitions:
            self.bus.publish(StateTransition(transition))

    def _observe(self, name: str, reply: StateReply) -> None:
        state = reply.state
        # closed and not forced open fleet-wide: this process may admit on its own for a while
        self._closed_seen_at[name] = time.monotonic() if state == br.CLOSED and reply.mode != MODE_FORCED_OPEN \
            else None
        self._seen_state[name] = state
        if state == br.OPEN and reply.opened_at is not None:
            self._open_until[name] = (reply.opened_at, self.clock.time())
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
        """A unit of quota: from this process's lease, else one small script that may grant one.

        None when Redis is unreachable. The lease book's key is the integration's counters
        (this hour's and this day's): a new window starts a new lease; ``terms`` are the limits,
        so a saved policy's new limits are never spent from a lease taken under the old ones.
        """
        keys = lua_api.quota_keys(self.prefix, policy.name, self.clock.time())
        return self.quota_leases.take("|".join(keys), (policy.hourly_limit, policy.daily_limit), True,
                                      spend=_from_quota_lease,
                                      ask=functools.partial(self._count_quota, policy, keys))

    def _count_quota(self, policy: Policy, keys: list[str], settlement: Settlement,
                     wanted: int) -> tuple[Permit | None, Grant]:
        """One round trip: this call's unit, ``settlement``'s unspent units given back, a lease asked for."""
        reply = self.link.call(self._quota_script, keys=keys, args=lua_api.quota_argv(
            policy.hourly_limit, policy.daily_limit, give_back=settlement.size - settlement.used, lease_wanted=wanted, lease_share=LEASE_SHARE))
        if reply is None:
            return None, _NO_GRANT
        taken = lua_api.decode_quota(reply)
        if taken.granted:
            self.link.ensure_flusher()
        if taken.full is not None:
            permit = Permit(False, category=ErrorCategory.QUOTA_EXCEEDED, reason=f"{taken.full} quota reached",
                            shared=True)
            return permit, _NO_GRANT
        return _SHARED_ADMITTED, Grant("", taken.granted, 0, 0.0)

    def settle_quota_leases(self, everything: bool = False) -> None:
        """Give back the unspent units of quota leases past their time (or of all): one pipelined round trip."""
        due = self.quota_leases.due(everything)
        if not due or self.link.waiting():
            return
        pipe = self.client.pipeline(transaction=False)
        for key, (hourly_limit, daily_limit), settlement in due:
            self._quota_script(keys=key.split("|"), client=pipe, args=lua_api.quota_argv(
                hourly_limit, daily_limit, count=False, give_back=settlement.size - settlement.used))
        # unreachable: the unspent units stay counted until their window ends (refusals a little early)
        self.link.call(pipe.execute)

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
        lease = unique_id()
        reply = self._run(ACQUIRE, policy, is_retry=is_retry, deferred=self._take_pending(policy.name), lease=lease)
        if reply is None:
            return self.local.acquire(policy, is_retry)
        transitions, reason = reply.transitions, reply.reason
        if reply.revision > policy.revision:
            self._stale_policy(policy)
        if reply.decision == REFUSE:
            if reason == "budget":
                return Permit(False, reason=RETRY_BUDGET, transitions=transitions, shared=True)
            if reason.startswith("quota:"):
                return Permit(False, category=ErrorCategory.QUOTA_EXCEEDED,
                              reason=f"{reason[6:]} quota reached", transitions=transitions, shared=True)
            return Permit(False, category=ErrorCategory.CIRCUIT_OPEN, reason=_refusal_text(reason, policy),
                          transitions=transitions, shared=True)
        return Permit(True, trial=reply.decision == TRIAL, transitions=transitions, shared=True, lease=lease)

    def record(self, policy: Policy, permit: Permit, outcome: str, slow: bool,
               is_retry: bool) -> tuple[Transition, ...]:
        if not permit.shared:
            return self.local.record(policy, permit, outcome, slow, is_retry)
        if outcome == br.SUCCESS and not slow and not permit.trial and \
                self._seen_state.get(policy.name) == br.CLOSED and self._defer(policy, is_retry):
            return ()
        if outcome == br.IGNORED and not permit.trial and not is_retry:
            return ()  # counts as neither, holds no lease nor budget: nothing to tell Redis
        reply = self._run(RECORD, policy, is_retry=is_retry, deferred=self._take_pending(policy.name),
                          outcome=outcome, slow=slow, trial=permit.trial, lease=permit.lease)
        if reply is None:
            return ()  # Redis left mid-call: this outcome goes with the outage
        return reply.transitions

    def snapshot(self, policy: Policy) -> BreakerSnapshot:
        reply = self._run(SNAPSHOT, policy, deferred=self._take_pending(policy.name))
        if reply is None:
            local = self.local.snapshot(policy)
            local.extra["shared"] = False
            return local
        return _snapshot_from(policy, reply)

    def _local_read(self, policy: Policy) -> tuple[BreakerSnapshot, QuotaUsage]:
        local = self.local.snapshot(policy)
        local.extra["shared"] = False
        return local, self.local.quota_usage(policy)

    def read_many(self, policies: list[Policy]) -> list[tuple[BreakerSnapshot, QuotaUsage]]:
        """Every policy's breaker and quota in one pipelined round trip (a page of the console)."""
        if not policies:
            return []
        if self.link.waiting():
            return [self._local_read(policy) for policy in policies]
        now = self.clock.time()
        calls = [(lua_api.state_keys(self.prefix, policy.name, now),
                  lua_api.state_argv(SNAPSHOT, policy, now, deferred=self._take_pending(policy.name)),
                  lua_api.quota_keys(self.prefix, policy.name, now))
                 for policy in policies]
        for first_try in (True, False):
            pipe = self.client.pipeline(transaction=False)
            for keys, args, quota_keys in calls:
                pipe.evalsha(self._state_script.sha, len(keys), *keys, *args)
                pipe.mget(*quota_keys)
            try:
                replies = pipe.execute(raise_on_error=False)
            except UNREACHABLE as exc:
                self.link.lost(exc)
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
            self.link.regained()
        reads = []
        for (_, _, quota_keys), policy, state, counters in zip(calls, policies, replies[0::2], replies[1::2]):
            reply = lua_api.decode_state(policy.name, state)
            self._observe(policy.name, reply)
            reads.append((_snapshot_from(policy, reply), self._usage(policy, now, quota_keys, counters)))
        return reads

    def _usage(self, policy: Policy, now: float, keys: list[str], counters) -> QuotaUsage:
        """The quota used, from the window counters read in Redis.

        What this process leased and has not spent is not used yet; other processes' leases are
        (they are spent or given back within a second).
        """
        ahead = self.quota_leases.unspent("|".join(keys))
        hourly, daily = (max(int(counter or 0) - ahead, 0) for counter in counters)
        return QuotaUsage(policy.name, hourly, policy.hourly_limit, daily, policy.daily_limit,
                          window_start(now, HOUR) + HOUR, window_start(now, DAY) + DAY)

    def quota_usage(self, policy: Policy) -> QuotaUsage:
        now = self.clock.time()
        keys = lua_api.quota_keys(self.prefix, policy.name, now)
        used = self.link.call(self.client.mget, *keys)
        if used is None:
            return self.local.quota_usage(policy)
        return self._usage(policy, now, keys, used)

    def reset(self, policy: Policy, by: str | None = None, reason: str = "manual reset") -> Transition | None:
        self._take_pending(policy.name)  # the window is cleared: successes still waiting say nothing more
        local = self.local.reset(policy, by, reason)  # the per-process view too, for when Redis is away
        reply = self._run(RESET, policy, by=by or "", reason=reason)
        if reply is None:
            return local
        return reply.transitions[0] if reply.transitions else None

    def publish_policy(self, policy: Policy) -> None:
        self._run(PUBLISH, policy)

    def _stale_policy(self, policy: Policy) -> None:
        if self.on_stale_policy is not None:
            self.on_stale_policy(policy.name)


def _snapshot_from(policy: Policy, reply: StateReply) -> BreakerSnapshot:
    """A snapshot's reply as the engine's BreakerSnapshot (its counts carry BreakerSnapshot's names)."""
    return BreakerSnapshot(integration=policy.name, state=reply.state, mode=reply.mode, opened_at=reply.opened_at,
                           **reply.counts, extra={"shared": True})


def _refusal_text(reason: str, policy: Policy) -> str:
    if reason == "forced":
        return FORCED_OPEN_REASON
    if reason == "half_open":
        return f"breaker half-open: {policy.half_open_max_calls} trial call(s) already in flight"
    return OPEN_REASON

