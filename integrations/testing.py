"""Helpers for your own test suite: guarded calls on a clock you drive, with no real sleeps.

    from integrations.testing import resilience_test_engine

    def test_checkout_survives_a_billing_outage(db):
        with resilience_test_engine() as engine:
            engine.open_breaker("billing")
            response = client.post("/checkout/")       # your view calls execute("billing", ...)
            assert response.status_code == 200        # ... and served its fallback
            engine.advance(60)                          # past reset_timeout_s: half-open

``resilience_test_engine`` installs, for the block, an engine with

- a ``FakeClock``: backoff and ``clock.sleep`` advance it at once (``engine.clock.sleeps``
  records every wait), so retries cost no real time;
- per-process state (``LocalStore``), whatever RESILIENCE_REDIS_URL says: nothing a test
  does reaches a shared Redis, and nothing another process does reaches the test;
- inline timeouts (no worker threads), so a call's duration is what the clock says;
- policies from your Integration rows (as in production) and/or ``policies=[Policy(...)]``.

``redrive_now()`` runs one redrive of the dead letter queue in the calling thread (no
django-q cluster), due or not. docs/testing.md has a fuller walk-through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Iterable, Iterator

from .resilience import Engine, Policy, _policy_source, use_engine
from .resilience.breaker import CLOSED, OPEN
from .resilience.cache import ResponseCache
from .resilience.clock import FakeClock
from .resilience.events import EventBus
from .resilience.events import bus as default_bus
from .resilience.policy import TIMEOUT_INLINE
from .resilience.registry import PolicyRegistry
from .resilience.state import LocalStore

__all__ = ["FakeClock", "TestEngine", "redrive_now", "resilience_test_engine"]


class TestEngine(Engine):
    """An Engine with the knobs a test needs: drive the clock, force a breaker, spend a quota."""

    __test__ = False  # not a pytest test class, despite its name

    store: LocalStore
    clock: FakeClock

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.given: dict[str, Policy] = {}  # use_policy's: they win over the Integration rows

    def advance(self, seconds: float) -> None:
        """Move time on: open breakers half-open once reset_timeout_s has passed, quota windows roll."""
        self.clock.advance(seconds)

    def use_policy(self, policy: Policy) -> Policy:
        """Use this policy for its integration (instead of, or without, an Integration row)."""
        policy = _inline(policy)
        self.given[policy.name] = policy
        self.registry.put(policy)
        return policy

    def open_breaker(self, name: str) -> None:
        """Trip ``name``'s breaker now, as failures would: calls are refused (CIRCUIT_OPEN) until
        reset_timeout_s has passed on the clock, then trial calls are let through (half-open)."""
        self.set_breaker_state(name, OPEN)

    def close_breaker(self, name: str) -> None:
        self.set_breaker_state(name, CLOSED)

    def set_breaker_state(self, name: str, state: str) -> None:
        if state not in (OPEN, CLOSED):
            raise ValueError(f"state must be {OPEN!r} or {CLOSED!r}; got {state!r} "
                             f"(half-open follows an open breaker once its reset timeout has passed).")
        policy = self.registry.get(name)
        cell = self.store._cell(policy)
        now = self.clock.time()
        with cell.lock:
            if state == OPEN:
                transition = cell.breaker._trip("forced by a test", now)
            else:
                transition = cell.breaker.reset(now, "test", "closed by a test")
        if transition is not None:
            self.publish_transition(transition)

    def spend_quota(self, name: str, window: str = "hourly") -> None:
        """Use up ``name``'s hourly or daily quota: its next call is refused with QUOTA_EXCEEDED."""
        if window not in ("hourly", "daily"):
            raise ValueError(f"window must be 'hourly' or 'daily'; got {window!r}.")
        policy = self.registry.get(name)
        limit = policy.hourly_limit if window == "hourly" else policy.daily_limit
        if limit is None:
            raise ValueError(f"integration {name!r} has no {window} quota (its {window}_limit is unset).")
        cell = self.store._cell(policy)
        with cell.lock:
            quota = cell.quota
            quota.usage(policy, self.clock.time())  # rolls the windows to the clock's hour and day
            if window == "hourly":
                quota.hour_used = limit
            else:
                quota.day_used = limit


def _inline(policy: Policy) -> Policy:
    return dataclasses.replace(policy, timeout_enforcement=TIMEOUT_INLINE)


@contextlib.contextmanager
def resilience_test_engine(*, policies: Iterable[Policy] = (), clock: FakeClock | None = None, seed: int = 0,
                           orm_policies: bool = True, bus: EventBus | None = None) -> Iterator[TestEngine]:
    """Run the block against a deterministic, per-process engine (see the module's docstring).

    ``orm_policies=False`` needs no database: only ``policies`` are known (an unknown name
    raises ImproperlyConfigured, as in production without RESILIENCE_AUTO_REGISTER), and the
    engine's events go to a bus of its own (``bus``) instead of the apps' subscribers, which
    write breaker events, statistics and dead letters to the database.
    """
    engine: TestEngine | None = None
    orm_loader, creator = _policy_source["loader"], _policy_source["creator"]

    def given_or_orm(name):
        if name in engine.given:
            return engine.given[name]
        policy = orm_loader(name) if orm_loader is not None else None
        return None if policy is None else _inline(policy)

    loader = given_or_orm if orm_policies else None
    creator = creator if orm_policies else None

    clock = clock or FakeClock()
    # refresh_s=0: an Integration row a test saves is what the next call uses
    registry = PolicyRegistry(loader=loader, creator=creator, refresh_s=0)
    engine = TestEngine(registry=registry, store=LocalStore(clock), cache=ResponseCache(), clock=clock,
                        rng=random.Random(seed), bus=bus or (default_bus if orm_policies else EventBus()))
    for policy in policies:
        engine.use_policy(policy)
    with use_engine(engine):
        yield engine


def redrive_now(integration: str | None = None):
    """Redrive every pending dead letter (of ``integration``, or all) now, in this thread.

    Entries waiting for their backoff are made due first. Returns the RedriveReport
    (``succeeded``, ``failed``, ``dead`` ... counts).
    """
    from django.utils import timezone

    from .dlq.models import DeadLetter
    from .dlq.redrive import Redriver

    entries = DeadLetter.objects.all()
    if integration is not None:
        entries = entries.filter(integration_name=integration)
    entries.waiting().update(next_attempt_at=timezone.now())
    return Redriver.from_settings().run(entries)
