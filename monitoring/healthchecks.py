"""Health probes: an HTTP GET, or a Python check registered by name.

    from monitoring.healthchecks import health_check

    @health_check("orders-db")
    def orders_db_answers():
        with connections["orders"].cursor() as cursor:
            cursor.execute("SELECT 1")

A Python check is healthy when it returns anything but False; it is unhealthy
when it returns False, raises, or runs past the check's timeout (it then
finishes in a background thread; its result is ignored). ``HealthCheck.run``
probes, keeps the result and moves the health; this module only probes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable

import httpx

_CHECKS: dict[str, Callable[[], object]] = {}
_runner = ThreadPoolExecutor(max_workers=4, thread_name_prefix="health-check")


@dataclass(frozen=True)
class ProbeOutcome:
    ok: bool
    latency_ms: float
    status_code: int | None = None
    error: str = ""


def health_check(name: str):
    """Register a function as the Python check ``name`` (what HealthCheck.check_name refers to)."""

    def register(fn: Callable[[], object]) -> Callable[[], object]:
        existing = _CHECKS.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"a health check is already registered as {name!r}: {existing!r}")
        _CHECKS[name] = fn
        return fn

    return register


def registered_checks() -> list[str]:
    return sorted(_CHECKS)


def unregister(name: str) -> None:
    _CHECKS.pop(name, None)


def probe(check) -> ProbeOutcome:
    """Run a HealthCheck's probe once."""
    timeout_s = check.timeout_ms / 1000
    if check.kind == check.HTTP:
        return probe_http(check.url, check.expected_status, timeout_s)
    return probe_python(check.check_name, timeout_s)


def probe_http(url: str, expected_status: int, timeout_s: float) -> ProbeOutcome:
    started = time.perf_counter()
    try:
        response = httpx.get(url, timeout=timeout_s, follow_redirects=False)
    except httpx.TimeoutException:
        return ProbeOutcome(False, _since(started), error=f"no answer within {timeout_s * 1000:.0f} ms")
    except httpx.HTTPError as exc:  # connection refused, DNS, protocol: the upstream is not reachable
        return ProbeOutcome(False, _since(started), error=f"{type(exc).__name__}: {exc}")
    latency_ms = _since(started)
    if response.status_code != expected_status:
        return ProbeOutcome(False, latency_ms, response.status_code,
                            f"status {response.status_code}, expected {expected_status}")
    return ProbeOutcome(True, latency_ms, response.status_code)


def probe_python(name: str, timeout_s: float) -> ProbeOutcome:
    fn = _CHECKS.get(name)
    if fn is None:
        return ProbeOutcome(False, 0.0, error=f"no Python check is registered as {name!r}")
    started = time.perf_counter()
    future = _runner.submit(fn)
    try:
        verdict = future.result(timeout_s)
    except FutureTimeout:
        return ProbeOutcome(False, _since(started), error=f"did not finish within {timeout_s * 1000:.0f} ms")
    except Exception as exc:  # noqa: BLE001 - whatever a check raises is its verdict: unhealthy, with the reason
        return ProbeOutcome(False, _since(started), error=f"{type(exc).__name__}: {exc}")
    if verdict is False:
        return ProbeOutcome(False, _since(started), error="the check returned False")
    return ProbeOutcome(True, _since(started))


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
