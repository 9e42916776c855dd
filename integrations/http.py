"""An httpx client whose every request goes through an integration's pipeline.

    client = Client("billing", base_url="https://billing.example")
    response = client.get("/invoices/42")     # httpx.Response, or ResilienceError

Attempts run as the integration's ``timeout_enforcement`` says (by default in
a worker thread, so the caller is never kept waiting), and httpx's own timeout
is set to the attempt's budget, so an abandoned request ends soon after. With
``inline`` enforcement no thread is used, but httpx applies that budget per
phase (connect, write, read), so a request can overrun it; the overrun then
counts as a TIMEOUT. Responses are classified: 5xx SERVER_ERROR,
429 RATE_LIMIT (its Retry-After honoured), other 4xx CLIENT_ERROR; connect and
network errors NETWORK, timeouts TIMEOUT. GET responses are cached when the
integration has a cache TTL. Fallbacks given to the client apply to every
request; they must yield an httpx.Response or whatever the caller expects.
"""

from __future__ import annotations

import time

import httpx

from .errors import ResilienceError, category_for_status
from .resilience import get_engine
from .resilience.retry import parse_retry_after
from .resilience.timeouts import attempt_time_left

# Methods whose responses may be served from the cache.
CACHEABLE_METHODS = frozenset({"GET", "HEAD"})


def raise_for_category(response: httpx.Response, integration: str) -> httpx.Response:
    """Return a successful response; raise the ResilienceError an unsuccessful one stands for."""
    category = category_for_status(response.status_code)
    if category is None:
        return response
    request = response.request
    raise ResilienceError(
        category,
        f"{request.method} {request.url} returned {response.status_code} {response.reason_phrase}".strip(),
        integration=integration,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        status=response.status_code,
        body=response.text[:500],
    )


_DEAD_LETTER = "resilience.dead_letter"  # request extension carrying the request's DeadLetter


def read_within(response: httpx.Response, request: httpx.Request, deadline: float | None) -> httpx.Response:
    """The whole response, read by the deadline (monotonic), or ReadTimeout.

    httpx's timeout bounds each read, not the response: an upstream trickling
    its answer would hold the attempt's thread and bulkhead slot for as long
    as it drips. Reading chunk by chunk against the attempt's deadline ends it
    soon after the timeout (within one read's timeout at most).
    """
    raw = bytearray()
    try:
        for chunk in response.iter_raw():
            raw += chunk
            if deadline is not None and time.monotonic() > deadline:
                raise httpx.ReadTimeout("the response did not arrive within the attempt's timeout", request=request)
    finally:
        response.close()
    complete = httpx.Response(response.status_code, headers=response.headers, content=bytes(raw), request=request,
                              extensions=response.extensions)
    complete.read()
    return complete


class Client(httpx.Client):
    def __init__(self, integration: str, *, fallbacks=(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.integration = integration
        self.fallbacks = tuple(fallbacks)

    def request(self, method: str, url, *, dead_letter=None, **kwargs) -> httpx.Response:
        """httpx's ``request``, plus ``dead_letter=DeadLetter(...)``: kept if the request finally fails.

            client.request("POST", "/charges", json=order, dead_letter=DeadLetter("billing.charge", order))
        """
        if dead_letter is not None:
            kwargs["extensions"] = {**(kwargs.get("extensions") or {}), _DEAD_LETTER: dead_letter}
        return super().request(method, url, **kwargs)

    def send(self, request: httpx.Request, *, stream: bool = False, **kwargs) -> httpx.Response:
        if stream:
            raise ValueError("integrations.http.Client reads whole responses: streaming cannot be retried or cached")

        def attempt() -> httpx.Response:
            budget = attempt_time_left()
            if budget is not None:
                request.extensions = {**request.extensions, "timeout": httpx.Timeout(budget).as_dict()}
            response = super(Client, self).send(request, stream=True, **kwargs)
            complete = read_within(response, request, None if budget is None else time.monotonic() + budget)
            return raise_for_category(complete, self.integration)

        if request.method in CACHEABLE_METHODS:
            cache_key = {"method": request.method, "url": str(request.url), "headers": sorted(request.headers.items())}
        else:
            cache_key = False  # a POST's response is never served to another POST
        dead_letter = request.extensions.get(_DEAD_LETTER)
        result = get_engine().call(self.integration, attempt, cache_key=cache_key, fallbacks=self.fallbacks,
                                   dead_letter=dead_letter)
        return result.unwrap()
