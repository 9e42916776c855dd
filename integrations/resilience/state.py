"""Where breaker, quota and retry-budget state lives: one interface, two stores.

``LocalStore`` keeps state per process (thread-safe); the Redis store shares
it across processes and hosts behind the same interface. The engine calls
``acquire`` before each attempt and ``record`` after it, and never knows which
store it has. A store returns the transitions it caused; the engine publishes
them as events.

A store also hands out the inbound rate limiter that counts where it keeps
its state (``rate_limiter``; the limiters are in rate_limit.py).
"""

from __future__ import annotations

import abc
import threading

from ..errors import ErrorCategory
from . import breaker as br
from .breaker import BreakerCell, BreakerSnapshot, Transition
from .clock import SystemClock
from .policy import MODE_FORCED_OPEN, MODE_NORMAL, Policy
from .quota import QuotaCell, QuotaUsage
from .rate_limit import LocalRateLimiter, RateLimiter

# Why a permit was refused, beyond an ErrorCategory.
RETRY_BUDGET = "retry budget exhausted"
FORCED_OPEN_REASON = "breaker forced open by an operator"
OPEN_REASON = "breaker open"


class Permit:
    """The store's answer to "may this attempt go to the upstream?"."""

    __slots__ = ("allowed", "trial", "category", "reason", "transitions", "shared", "lease")

    def __init__(
        self,
        allowed: bool,
        trial: bool = False,
        category: ErrorCategory | None = None,
        reason: str = "",
        transitions: tuple[Transition, ...] = (),
        shared: bool = False,
        lease: str = "",
    ) -> None:
        self.allowed = allowed
        self.trial = trial
        self.category = category
        self.reason = reason
        self.transitions = transitions
        self.shared = shared  # issued by the shared store (its record must go there too)
        self.lease = lease  # the shared store's half-open probe lease, released by record()


ADMITTED = Permit(True)


class StateStore(abc.ABC):
    """The state of every integration, as the engine needs it."""

    shared = False
    # The inbound rate limiter counting where this store keeps its state (RateLimitMiddleware's).
    rate_limiter: RateLimiter
    # Called with an integration's name when the store learns that a newer
    # policy was saved elsewhere; the engine points it at its registry.
    on_stale_policy = None

    def refusal(self, policy: Policy) -> str | None:
        """Why a call would be refused right now, judged without a lock or a round trip.

        Only a forced-open mode or a breaker known to be open within its reset
        timeout; None means "ask acquire()". Used to fail fast before any work.
        """
        return FORCED_OPEN_REASON if policy.mode == MODE_FORCED_OPEN else None

    @abc.abstractmethod
    def acquire(self, policy: Policy, is_retry: bool = False) -> Permit:
        """Breaker permission, retry budget and quota for one attempt, atomically."""

    @abc.abstractmethod
    def record(self, policy: Policy, permit: Permit, outcome: str, slow: bool,
               is_retry: bool) -> tuple[Transition, ...]:
        """The attempt's outcome (breaker.SUCCESS, FAILURE or IGNORED) and the transitions it caused."""

    @abc.abstractmethod
    def snapshot(self, policy: Policy) -> BreakerSnapshot: ...

    @abc.abstractmethod
    def quota_usage(self, policy: Policy) -> QuotaUsage: ...

    def read_many(self, policies: list[Policy]) -> list[tuple[BreakerSnapshot, QuotaUsage]]:
        """Each policy's breaker and quota, for pages that show many (a shared store: one round trip)."""
        return [(self.snapshot(policy), self.quota_usage(policy)) for policy in policies]

    @abc.abstractmethod
    def reset(self, policy: Policy, by: str | None = None, reason: str = "manual reset") -> Transition | None:
        """Close the breaker and clear its counts (an operator's action)."""

    def publish_policy(self, policy: Policy) -> None:
        """A policy was saved: make its mode and revision known to every process (shared stores)."""


class _Cell:
    __slots__ = ("lock", "breaker", "quota")

    def __init__(self, policy: Policy) -> None:
        self.lock = threading.Lock()
        self.breaker = BreakerCell(policy.name, policy.window_size, policy.time_window_s)
        self.quota = QuotaCell()


class LocalStore(StateStore):
    """Per-process state: what a single worker sees, guarded by one lock per integration."""

    def __init__(self, clock=None) -> None:
        self.clock = clock or SystemClock()
        self._cells: dict[str, _Cell] = {}
        self._cells_lock = threading.Lock()
        self.rate_limiter = LocalRateLimiter(self.clock)

    def _cell(self, policy: Policy) -> _Cell:
        cell = self._cells.get(policy.name)
        if cell is None:
            with self._cells_lock:
                cell = self._cells.setdefault(policy.name, _Cell(policy))
        return cell

    def refusal(self, policy: Policy) -> str | None:
        if policy.mode != MODE_NORMAL:
            return super().refusal(policy)
        cell = self._cells.get(policy.name)
        if cell is None:
            return None
        breaker = cell.breaker
        opened_at = breaker.opened_at  # read before the state: a racing close clears it
        if breaker.state == br.OPEN and opened_at is not None and \
                self.clock.time() - opened_at < policy.reset_timeout_s:
            return OPEN_REASON
        return None

    def acquire(self, policy: Policy, is_retry: bool = False) -> Permit:
        cell = self._cell(policy)
        now = self.clock.time()
        with cell.lock:
            breaker = cell.breaker
            if is_retry and not breaker.retry_allowed(policy, now):
                return Permit(False, reason=RETRY_BUDGET)
            decision, transition = breaker.admit(policy, now)
            transitions = () if transition is None else (transition,)
            if decision == br.REFUSED:
                return Permit(False, category=ErrorCategory.CIRCUIT_OPEN, reason=_open_reason(breaker, policy),
                              transitions=transitions)
            exhausted = cell.quota.consume(policy, now)
            if exhausted is not None:
                if decision == br.TRIAL:
                    breaker.half_open_in_flight -= 1
                return Permit(False, category=ErrorCategory.QUOTA_EXCEEDED, reason=f"{exhausted} quota reached",
                              transitions=transitions)
            if is_retry:
                breaker.retries_in_flight += 1  # spent from the budget now, recorded when it ends
        if decision == br.ADMITTED and not transitions:
            return ADMITTED
        return Permit(True, trial=decision == br.TRIAL, transitions=transitions)

    def record(self, policy: Policy, permit: Permit, outcome: str, slow: bool,
               is_retry: bool) -> tuple[Transition, ...]:
        cell = self._cell(policy)
        now = self.clock.time()
        with cell.lock:
            transition = cell.breaker.record(policy, now, outcome, slow, permit.trial, is_retry)
        return () if transition is None else (transition,)

    def snapshot(self, policy: Policy) -> BreakerSnapshot:
        cell = self._cell(policy)
        now = self.clock.time()
        with cell.lock:
            return cell.breaker.snapshot(policy, now)

    def quota_usage(self, policy: Policy) -> QuotaUsage:
        cell = self._cell(policy)
        now = self.clock.time()
        with cell.lock:
            return cell.quota.usage(policy, now)

    def reset(self, policy: Policy, by: str | None = None, reason: str = "manual reset") -> Transition | None:
        cell = self._cell(policy)
        now = self.clock.time()
        with cell.lock:
            return cell.breaker.reset(now, by, reason)


def _open_reason(breaker: BreakerCell, policy: Policy) -> str:
    if policy.mode == MODE_FORCED_OPEN:
        return FORCED_OPEN_REASON
    if breaker.state == br.HALF_OPEN:
        return f"breaker half-open: {policy.half_open_max_calls} trial call(s) already in flight"
    return OPEN_REASON
