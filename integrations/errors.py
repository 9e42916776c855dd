"""The error taxonomy every guarded call is described with.

An operation may raise ``ResilienceError(ErrorCategory.X, "message", **details)``
itself; anything else it raises is turned into one by :func:`classify`.
"""

from __future__ import annotations

import enum
from time import time as _now
from typing import Any

import httpx


class ErrorCategory(str, enum.Enum):
    TIMEOUT = "timeout"
    RATE_LIMIT = "rate_limit"
    NETWORK = "network"
    SERVER_ERROR = "server_error"
    CLIENT_ERROR = "client_error"
    VALIDATION = "validation"
    CIRCUIT_OPEN = "circuit_open"
    QUOTA_EXCEEDED = "quota_exceeded"
    BULKHEAD_FULL = "bulkhead_full"
    DEGRADED = "degraded"
    UNKNOWN = "unknown"

    @property
    def retryable(self) -> bool:
        return self in RETRYABLE

    @property
    def counts_as_failure(self) -> bool:
        """Whether the breaker counts it against the upstream."""
        return self in BREAKER_FAILURES

    @property
    def is_refusal(self) -> bool:
        """Refused by the pipeline itself: the upstream was never called."""
        return self in REFUSALS


RETRYABLE = frozenset(
    {ErrorCategory.TIMEOUT, ErrorCategory.NETWORK, ErrorCategory.SERVER_ERROR, ErrorCategory.RATE_LIMIT}
)
BREAKER_FAILURES = RETRYABLE | {ErrorCategory.UNKNOWN}
REFUSALS = frozenset(
    {
        ErrorCategory.CIRCUIT_OPEN,
        ErrorCategory.QUOTA_EXCEEDED,
        ErrorCategory.BULKHEAD_FULL,
        ErrorCategory.DEGRADED,
    }
)


class ResilienceError(Exception):
    """A failed guarded call, in the product's terms.

    ``retry_after`` (seconds), when an upstream asked for it, is honoured by
    the retry policy. Every other keyword lands in ``details``.
    """

    def __init__(
        self,
        category: ErrorCategory | str,
        message: str = "",
        *,
        code: str | None = None,
        integration: str | None = None,
        retry_after: float | None = None,
        **details: Any,
    ) -> None:
        if category.__class__ is not ErrorCategory:
            category = ErrorCategory(category)
        self.category = category
        self.message = message or category.value.replace("_", " ")
        self.code = code or category.value
        self.integration = integration
        self.retry_after = retry_after
        self.details = details
        self.timestamp = _now()
        Exception.__init__(self, self.message)

    @property
    def retryable(self) -> bool:
        return self.category.retryable

    def __str__(self) -> str:
        where = f"[{self.integration}] " if self.integration else ""
        return f"{where}{self.category.value}: {self.message}"

    def __repr__(self) -> str:
        return f"ResilienceError({self.category.name}, {self.message!r}, integration={self.integration!r})"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the API, the admin and the dead letter queue."""
        return {
            "category": self.category.value,
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
            "integration": self.integration,
            "retry_after": self.retry_after,
            "details": self.details,
            "timestamp": self.timestamp,
        }


def category_for_status(status: int) -> ErrorCategory | None:
    """The category of an HTTP status, or None when it is a success."""
    if status == 429:
        return ErrorCategory.RATE_LIMIT
    if status >= 500:
        return ErrorCategory.SERVER_ERROR
    if status >= 400:
        return ErrorCategory.CLIENT_ERROR
    return None


def classify(exc: BaseException, integration: str | None = None) -> ResilienceError:
    """Describe any exception an operation raised as a ResilienceError.

    The original exception is kept as ``__cause__`` and named in details.
    """
    if isinstance(exc, ResilienceError):
        if exc.integration is None:
            exc.integration = integration
        return exc
    category = _category_of(exc)
    details: dict[str, Any] = {"exception": f"{type(exc).__module__}.{type(exc).__qualname__}"}
    if isinstance(exc, httpx.HTTPStatusError):
        details["status"] = exc.response.status_code
    error = ResilienceError(category, str(exc) or type(exc).__name__, integration=integration, **details)
    error.__cause__ = exc
    return error


def _category_of(exc: BaseException) -> ErrorCategory:
    # TimeoutError is an OSError: it must be tested first.
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return ErrorCategory.TIMEOUT
    if isinstance(exc, httpx.HTTPStatusError):
        return category_for_status(exc.response.status_code) or ErrorCategory.UNKNOWN
    if isinstance(exc, (OSError, httpx.TransportError)):
        return ErrorCategory.NETWORK
    return ErrorCategory.UNKNOWN
