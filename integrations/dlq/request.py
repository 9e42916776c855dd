"""What a call site hands over: ``DeadLetter(handler_name, payload, ...)``.

    execute("billing", charge, order.id,
            dead_letter=DeadLetter("billing.charge", {"order": order.id}, idempotency_key=f"charge-{order.id}"))

Everything is checked here, when the call site builds it and before the call
runs: a payload that is not plain JSON data, or a handler no module
registered, is a programming error and fails loudly now rather than in a
redrive hours later.
"""

from __future__ import annotations

from typing import Any

from .handlers import get_handler
from .jsondata import json_payload

MAX_REDRIVES_LIMIT = 1000
IDEMPOTENCY_KEY_MAX_LENGTH = 255


def check_max_redrives(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_redrives must be an int, got {value!r}")
    if not 1 <= value <= MAX_REDRIVES_LIMIT:
        raise ValueError(f"max_redrives must be between 1 and {MAX_REDRIVES_LIMIT}, got {value}")
    return value


def check_idempotency_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"idempotency_key must be a str, got {value!r}")
    if not value or len(value) > IDEMPOTENCY_KEY_MAX_LENGTH:
        raise ValueError(f"idempotency_key must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} characters, "
                         f"got {len(value)}")
    return value


class DeadLetter:
    """The work a call leaves behind if it finally fails: ``execute(..., dead_letter=DeadLetter(...))``.

    ``handler`` and ``payload`` are what the engine reads; ``extra`` carries
    the options to the dead letter queue.
    """

    __slots__ = ("handler", "payload", "idempotency_key", "max_redrives")

    def __init__(self, handler_name: str, payload: Any, *, idempotency_key: str | None = None,
                 max_redrives: int | None = None) -> None:
        if not isinstance(handler_name, str):
            raise TypeError(f"DeadLetter needs a handler name (str), got {handler_name!r}")
        self.handler = get_handler(handler_name).name
        self.payload = json_payload(payload)
        self.idempotency_key = check_idempotency_key(idempotency_key)
        self.max_redrives = check_max_redrives(max_redrives)

    @property
    def extra(self) -> dict:
        return {"idempotency_key": self.idempotency_key, "max_redrives": self.max_redrives}

    def __repr__(self) -> str:
        return (f"DeadLetter({self.handler!r}, {self.payload!r}, idempotency_key={self.idempotency_key!r}, "
                f"max_redrives={self.max_redrives!r})")
