"""Helpers of the DLQ tests: a wall clock the tests move, and entries made in one line."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from integrations.dlq.models import DeadLetter
from integrations.dlq.redrive import RateCap, Redriver


class SteppedNow:
    """A wall clock for ``Redriver(now=...)`` that only moves when a test says so."""

    def __init__(self, start=None) -> None:
        self.at = start or timezone.now()

    def __call__(self):
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


def make_redriver(now, **knobs) -> Redriver:
    knobs.setdefault("batch_size", 100)
    knobs.setdefault("lease_s", 60)
    knobs.setdefault("rate_cap", RateCap(0, "default"))
    return Redriver(now=now, worker="test-worker", **knobs)


def enqueue(handler="dlq_test.noop", payload=None, integration="svc", **kwargs) -> DeadLetter:
    entry, _ = DeadLetter.enqueue(integration, handler, {} if payload is None else payload, **kwargs)
    return entry
