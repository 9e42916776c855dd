"""integrations.resilience.backoff: the one backoff formula of the engine's retries and the DLQ's redrives."""

import random

import pytest

from integrations.dlq.models import backoff_delay_s
from integrations.resilience.backoff import EQUAL_JITTER, FULL_JITTER, NO_JITTER, exponential, jittered
from integrations.resilience.policy import Policy


def test_the_delay_grows_by_the_multiplier_up_to_the_ceiling():
    assert [exponential(n, 100, 2, 1000) for n in range(1, 7)] == [100, 200, 400, 800, 1000, 1000]
    assert exponential(0, 100, 2, 1000) == 100  # no attempt before the first: the base


def test_each_jitter_draws_where_it_says():
    rng = random.Random(7)
    full = [jittered(100, rng, FULL_JITTER) for _ in range(500)]
    equal = [jittered(100, rng, EQUAL_JITTER) for _ in range(500)]
    assert 0 <= min(full) < 10 and max(full) <= 100
    assert 50 <= min(equal) < 55 and max(equal) <= 100
    assert jittered(100, rng, NO_JITTER) == 100
    with pytest.raises(ValueError, match="unknown jitter 'half'"):
        jittered(100, rng, "half")


def test_the_engine_and_the_redrive_use_the_same_formula(settings):
    policy = Policy("billing", base_delay_ms=250, backoff_multiplier=2.0, max_delay_ms=3000, jitter=False)
    assert [policy.backoff_ms(n) for n in (1, 2, 3, 4, 5)] == [exponential(n, 250, 2, 3000) for n in (1, 2, 3, 4, 5)]
    settings.RESILIENCE_DLQ_BACKOFF_BASE_MS, settings.RESILIENCE_DLQ_BACKOFF_MAX_MS = 1000, 8000
    rng = random.Random(3)
    for attempt in (1, 2, 3, 4, 5):
        ceiling = exponential(attempt, 1.0, 2, 8.0)
        assert ceiling / 2 <= backoff_delay_s(attempt, rng) <= ceiling
