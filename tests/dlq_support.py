"""Helpers of the DLQ tests: a wall clock the tests move, entries made in one line, and the test
database as a DATABASE_URL for the processes (clusters) a test starts."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
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


def database_url() -> str:
    """The test database, as DATABASE_URL for the processes a test starts."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    if connection.vendor == "postgresql":
        password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
        return f"postgres://{db['USER']}{password}@{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"
    pytest.skip(f"no DATABASE_URL form for {connection.vendor}")
