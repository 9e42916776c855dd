"""The Lua scripts' interface in one place: their keys, their arguments by name, their replies decoded.

Python builds every script's KEYS and ARGV here, from the names below in their order, and
decodes every reply here into named fields; nothing else reads a position. Each script repeats
its layout in a comment block at its top and names its arguments in the same order
(tests/integrations/test_lua_api.py checks both against this module, and decodes replies of the real scripts).

state.lua: one integration's breaker, half-open probe leases, retry budget and quota.
    KEYS   STATE_KEYS, one integration's keys: one hash tag ``{name}``, so one Redis Cluster slot.
    ARGV   STATE_ARGV; ``op`` is one of OPS:
             acquire   may an attempt go (breaker, retry budget, quota)? takes a probe lease
                       in half-open and a unit of quota
             record    an attempt's outcome; releases its probe lease
             flush     nothing but the deferred successes every op carries first
             snapshot  the breaker's counts, for a page or a command
             reset     close the breaker and clear its window (an operator's: by, reason)
             publish   a saved policy: its mode and revision, for every process
    reply  STATE_REPLY, decoded by decode_state into a StateReply: the decision, the breaker
           after the op, the transitions it caused (TRANSITION each) and, for snapshot only,
           the counts (BREAKER_COUNTS, BreakerSnapshot's field names).
quota.lua: units of the hourly and daily quota (the closed-state fast path): one for the call,
    and a lease of more (rate_limit.LeaseBook's, as for the inbound limiter).
    KEYS   QUOTA_KEYS (the last two of STATE_KEYS)   ARGV QUOTA_ARGV
    reply  QUOTA_REPLY, decoded by decode_quota into a QuotaReply.
rate_limit.lua: one request against a sliding window, with rate_limit.LeaseBook's leases.
    KEYS   RATE_LIMIT_KEYS (rate_limit_key)   ARGV RATE_LIMIT_ARGV
    reply  RATE_LIMIT_REPLY, decoded by decode_rate_limit into a RateLimitReply.

A limit of -1 means none. Times are wall-clock seconds (``repr`` of a float: exact).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import redis

from .breaker import Transition
from .policy import Policy
from .quota import DAY, HOUR, window_start

LUA_DIR = Path(__file__).with_name("lua")


def load(client: redis.Redis, name: str) -> redis.commands.core.Script:
    """``lua/<name>.lua`` registered with ``client`` (sent by SHA; loaded again if Redis forgot it)."""
    return client.register_script((LUA_DIR / f"{name}.lua").read_text())


def argv(layout: tuple[str, ...], values: dict) -> list:
    """ARGV in ``layout``'s order from ``values`` by name: exactly the layout's names, or an error."""
    if len(values) != len(layout):  # with every layout name looked up below: the same names
        raise ValueError(f"not the script's arguments: extra {sorted(set(values) - set(layout))}, "
                         f"missing {sorted(set(layout) - set(values))}")
    return [values[name] for name in layout]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float_or_none(value) -> float | None:
    text = _text(value)
    return float(text) if text else None


def _limit(value: int | None) -> int:
    return -1 if value is None else value


# -- state.lua -----------------------------------------------------------------------------------

OPS = ("acquire", "record", "flush", "snapshot", "reset", "publish")
ACQUIRE, RECORD, FLUSH, SNAPSHOT, RESET, PUBLISH = OPS

STATE_KEYS = (
    "breaker",       # hash: the breaker's state, counts, window (a ring or time buckets), mode and policy revision
    "probe_leases",  # sorted set: half-open probe leases, scored by expiry
    "hourly_quota",  # counter of this hour's window
    "daily_quota",   # counter of this day's window
)

STATE_ARGV = (
    "op",                        # one of OPS
    "now",
    "mode",                      # the policy's; the one published to the breaker hash wins
    "failure_threshold",
    "failure_rate_threshold",    # %, 0: off
    "slow_call_rate_threshold",  # %, 0: off
    "window_size",               # a count window's calls
    "window_duration_s",         # a time window's seconds; 0: a count window
    "minimum_calls",
    "reset_timeout_s",
    "half_open_max_calls",
    "success_threshold",
    "retry_budget_percent",      # -1: none
    "hourly_limit",              # -1: none
    "daily_limit",               # -1: none
    "revision",                  # the policy's (publish writes it)
    "lease",                     # this attempt's probe lease id (acquire takes it, record releases it)
    "lease_ttl_s",               # a probe lease lapses after this (the attempt's timeout + 1 s)
    "key_ttl_s",                 # state idle this long is forgotten
    "is_retry",                  # '1' | '0'
    "deferred_successes",        # fast successes of first attempts, recorded before the op
    "deferred_retry_successes",  # the same for retries
    "deferred_at",               # when the first of them was recorded: a time window counts them in its bucket
    "outcome",                   # record: 'success' | 'failure' | 'ignored'
    "slow",                      # record: '1' | '0'
    "trial",                     # record: '1' | '0', the attempt held a probe lease
    "by",                        # reset: the operator ('' for none)
    "reason",                    # reset: why
)

# decisions
ADMIT, TRIAL, REFUSE = "admit", "trial", "refuse"

STATE_REPLY = (
    "decision",     # acquire: ADMIT, TRIAL (admitted holding a probe lease) or REFUSE; ADMIT otherwise
    "reason",       # REFUSE: 'budget', 'forced', 'open', 'half_open', 'quota:hourly' or 'quota:daily'
    "state",        # the breaker after the op: closed | open | half_open
    "opened_at",    # '' unless open
    "revision",     # the policy revision last published
    "mode",         # the mode in force
    "transitions",  # the transitions the op caused, each TRANSITION
    "counts",       # snapshot: BREAKER_COUNTS; an empty list otherwise
)
TRANSITION = ("from_state", "to_state", "reason", "at", "by")
BREAKER_COUNTS = (
    "changed_at",
    "consecutive_failures",
    "consecutive_successes",
    "half_open_in_flight",
    "window_calls",
    "window_failures",
    "window_slow",
    "window_retries",
)


def state_keys(prefix: str, integration: str, now: float) -> list[str]:
    """One integration's STATE_KEYS. ``{name}`` is a hash tag: they stay on one Redis Cluster slot."""
    base = f"{prefix}:{{{integration}}}"
    return [f"{base}:breaker", f"{base}:leases", f"{base}:quota:h:{window_start(now, HOUR)}",
            f"{base}:quota:d:{window_start(now, DAY)}"]


def state_argv(op: str, policy: Policy, now: float, *, is_retry: bool = False,
               deferred: tuple[int, int, float] = (0, 0, 0.0), outcome: str = "", slow: bool = False,
               trial: bool = False, lease: str = "", by: str = "", reason: str = "") -> list:
    """state.lua's ARGV for ``op`` on ``policy``'s breaker; ``deferred`` is (successes, retry successes,
    when the first of them was recorded)."""
    return argv(STATE_ARGV, {
        "op": op,
        "now": repr(now),
        "mode": policy.mode,
        "failure_threshold": policy.failure_threshold,
        "failure_rate_threshold": f"{policy.failure_rate_threshold:g}",
        "slow_call_rate_threshold": f"{policy.slow_call_rate_threshold:g}",
        "window_size": policy.window_size,
        "window_duration_s": policy.time_window_s,
        "minimum_calls": policy.minimum_calls,
        "reset_timeout_s": repr(float(policy.reset_timeout_s)),
        "half_open_max_calls": policy.half_open_max_calls,
        "success_threshold": policy.success_threshold,
        "retry_budget_percent": _limit(policy.retry_budget_percent),
        "hourly_limit": _limit(policy.hourly_limit),
        "daily_limit": _limit(policy.daily_limit),
        "revision": repr(policy.revision),
        "lease": lease,
        "lease_ttl_s": repr(policy.attempt_timeout_ms / 1000 + 1.0),
        "key_ttl_s": int(max(DAY, policy.reset_timeout_s * 2)),  # a day, or longer than it can stay open
        "is_retry": int(is_retry),
        "deferred_successes": deferred[0],
        "deferred_retry_successes": deferred[1],
        "deferred_at": repr(deferred[2]),
        "outcome": outcome,
        "slow": int(slow),
        "trial": int(trial),
        "by": by,
        "reason": reason,
    })


class StateReply(NamedTuple):
    """state.lua's reply by name (STATE_REPLY)."""

    decision: str
    reason: str
    state: str
    opened_at: float | None
    revision: float
    mode: str
    transitions: tuple[Transition, ...]
    counts: dict  # snapshot: BREAKER_COUNTS by name (changed_at a float or None, the rest ints); else {}


def decode_state(integration: str, reply) -> StateReply:
    """state.lua's reply for ``integration``'s breaker, with named fields."""
    fields = dict(zip(STATE_REPLY, reply, strict=True))
    counts = {}
    if fields["counts"]:
        for name, value in zip(BREAKER_COUNTS, fields["counts"], strict=True):
            counts[name] = _float_or_none(value) if name == "changed_at" else int(value)
    return StateReply(
        decision=_text(fields["decision"]),
        reason=_text(fields["reason"]),
        state=_text(fields["state"]),
        opened_at=_float_or_none(fields["opened_at"]),
        revision=float(fields["revision"]),
        mode=_text(fields["mode"]),
        transitions=tuple(_transition(integration, item) for item in fields["transitions"]),
        counts=counts,
    )


def _transition(integration: str, item) -> Transition:
    fields = dict(zip(TRANSITION, map(_text, item), strict=True))
    return Transition(integration, fields["from_state"], fields["to_state"], fields["reason"], float(fields["at"]),
                      fields["by"] or None)


# -- quota.lua -----------------------------------------------------------------------------------

QUOTA_KEYS = ("hourly_quota", "daily_quota")
QUOTA_ARGV = (
    "hourly_limit",  # -1: none
    "daily_limit",   # -1: none
    "count",         # '1': take a unit for this call; '0': only give back
    "give_back",     # unspent units of a lease taken earlier in these windows
    "lease_wanted",  # how big a lease is wanted (0: none)
    "lease_share",   # a lease is at most (limit - count) / lease_share in each limited window
)
QUOTA_REPLY = (
    "full",     # '' when this call's unit was taken (or none asked), else 'hourly' or 'daily'
    "granted",  # the lease's size (0: none)
)


class QuotaReply(NamedTuple):
    """quota.lua's reply by name (QUOTA_REPLY)."""

    full: str | None  # the full window, None when the unit was taken
    granted: int


def quota_keys(prefix: str, integration: str, now: float) -> list[str]:
    """quota.lua's KEYS: the same counters as state.lua's (its last two keys)."""
    return state_keys(prefix, integration, now)[len(STATE_KEYS) - len(QUOTA_KEYS):]


def quota_argv(hourly_limit: int | None, daily_limit: int | None, *, count: bool = True, give_back: int = 0,
               lease_wanted: int = 0, lease_share: int = 1) -> list:
    """quota.lua's ARGV; the limits are a policy's (None: none)."""
    return argv(QUOTA_ARGV, {"hourly_limit": _limit(hourly_limit), "daily_limit": _limit(daily_limit),
                             "count": int(count), "give_back": give_back, "lease_wanted": lease_wanted,
                             "lease_share": lease_share})


def decode_quota(reply) -> QuotaReply:
    fields = dict(zip(QUOTA_REPLY, reply, strict=True))
    return QuotaReply(full=_text(fields["full"]) or None, granted=int(fields["granted"]))


# -- rate_limit.lua ------------------------------------------------------------------------------

RATE_LIMIT_KEYS = ("window",)  # the window's sorted set (member: a request id, score: when it was counted)
RATE_LIMIT_ARGV = (
    "now",
    "window_s",
    "limit",
    "call_id",       # this call's id: the request's member, and the new lease's members' prefix
    "count",         # '1': count this request against the limit; '0': only settle a lease
    "settle_id",     # the lease to settle ('' for none): members "<id>:1".."<id>:<size>"
    "settle_size",
    "settle_used",   # how many of it were spent: counted again at now, the rest given back
    "lease_wanted",  # how big a new lease is wanted (0: none)
    "lease_share",   # a new lease is at most (limit - count) / lease_share
)
RATE_LIMIT_REPLY = (
    "allowed",    # 1 | 0 (a refused request is not counted)
    "remaining",  # left under the limit, the new lease not spent
    "reset_at",   # when the oldest counted request leaves the window
    "granted",    # the new lease's size (0: none)
)


class RateLimitReply(NamedTuple):
    """rate_limit.lua's reply by name (RATE_LIMIT_REPLY)."""

    allowed: bool
    remaining: int
    reset_at: float
    granted: int


def rate_limit_key(prefix: str, key: str) -> str:
    return f"{prefix}:ratelimit:{key}"


def rate_limit_argv(now: float, window_s: float, limit: int, call_id: str, count: bool, settle: tuple[str, int, int],
                    lease_wanted: int, lease_share: int) -> list:
    """rate_limit.lua's ARGV; ``settle`` is the lease to settle: (id, size, used), ('', 0, 0) for none."""
    settle_id, settle_size, settle_used = settle
    return argv(RATE_LIMIT_ARGV, {
        "now": repr(now), "window_s": repr(float(window_s)), "limit": limit, "call_id": call_id,
        "count": int(count), "settle_id": settle_id, "settle_size": settle_size, "settle_used": settle_used,
        "lease_wanted": lease_wanted, "lease_share": lease_share,
    })


def decode_rate_limit(reply) -> RateLimitReply:
    fields = dict(zip(RATE_LIMIT_REPLY, reply, strict=True))
    return RateLimitReply(allowed=bool(int(fields["allowed"])), remaining=int(fields["remaining"]),
                          reset_at=float(fields["reset_at"]), granted=int(fields["granted"]))
