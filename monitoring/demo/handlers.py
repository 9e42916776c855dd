"""The demo's payment call, which is also its dead letter handler ``demo.charge``.

A charge that fails (after retries, or refused by an open breaker) is left in
the dead letter queue with its payload; the redrive calls ``demo.charge``
with that payload through demo-payments' pipeline, which posts it again.
Processes that redrive import this module through
``RESILIENCE_DLQ_HANDLER_MODULES=monitoring.demo.handlers`` (``make up``
sets it for the django-q cluster); the demo command imports it itself.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from integrations.dlq import dead_letter_handler
from integrations.http import raise_for_category
from integrations.resilience.timeouts import attempt_time_left

from .upstream import HOST

PAYMENTS = "demo-payments"
CHARGE_HANDLER = "demo.charge"
DEFAULT_TIMEOUT_S = 5.0


@dead_letter_handler(CHARGE_HANDLER)
def charge(payload: dict) -> dict:
    """POST one charge to the simulated upstream named in the payload; the upstream's JSON answer.

    Raises ValueError (the redrive's "this payload can never work") for an
    upstream that is not on 127.0.0.1: the demo sends nothing anywhere else.
    """
    upstream = payload.get("upstream")
    if not isinstance(upstream, str) or urlsplit(upstream).hostname != HOST:
        raise ValueError(f"demo charges go to the simulated upstream on {HOST} only, not {upstream!r}")
    response = httpx.post(
        f"{upstream}/payments/charge",
        json={"order": payload["order"], "amount_cents": payload["amount_cents"]},
        headers={"Idempotency-Key": f"demo-charge-{payload['order']}"},
        timeout=attempt_time_left() or DEFAULT_TIMEOUT_S,
    )
    return raise_for_category(response, PAYMENTS).json()
