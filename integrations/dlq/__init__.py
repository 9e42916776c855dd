"""The dead letter queue: work a failed call leaves behind, redriven until it succeeds.

    from integrations.dlq import DeadLetter, dead_letter_handler

    @dead_letter_handler("billing.charge")
    def charge(payload): ...

    execute("billing", billing.charge, order.id,
            dead_letter=DeadLetter("billing.charge", {"order": order.id}, idempotency_key=f"charge-{order.id}"))

This package imports no model at import time, so any module may import it.
The DeadLetter *model* (the queue's rows) is ``integrations.dlq.models.DeadLetter``.
See docs/dlq.md.
"""

from .handlers import RedriveContext, dead_letter_handler
from .request import DeadLetter

__all__ = ["DeadLetter", "RedriveContext", "dead_letter_handler"]
