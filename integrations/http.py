"""httpx clients whose every request goes through an integration's pipeline.

    client = Client("billing", base_url="https://billing.example")
    response = client.get("/invoices/42")     # httpx.Response, or ResilienceError

    async with AsyncClient("billing", base_url="https://billing.example") as client:
        response = await client.get("/invoices/42")   # the same, under aexecute

Each phase of an attempt (connect, write, read) is bounded by the integration's
``connect_timeout_ms``, ``write_timeout_ms`` and ``read_timeout_ms`` when set,
and always by the attempt's time left.

The sync Client's attempts run in the caller's thread on a transport whose
every socket operation ends by the attempt's deadline (http_deadline.py: no
worker thread, the caller is still not kept past the deadline); through a
transport of the caller's own they run as the integration's
``timeout_enforcement`` says, with httpx's timeouts set to the attempt's
budget. An overrun counts as a TIMEOUT. Responses are classified: 5xx SERVER_ERROR,
429 RATE_LIMIT (its Retry-After honoured), other 4xx CLIENT_ERROR; connect and
network errors NETWORK, timeouts TIMEOUT. GET responses are cached when the
integration has a cache TTL. Fallbacks given to the client apply to every
request; they must yield an httpx.Response or whatever the caller expects.
"""

from __future__ import annotations

import dataclasses
import time

import httpx

from .errors import ErrorCategory, ResilienceError, category_for_status
from .http_deadline import DeadlineTransport
from .resilience import CallOptions, Policy, get_engine
from .resilience.options import call_options as checked_options
from .resilience.retry import parse_retry_after
from .resilience.timeouts import attempt_time_left

# Methods whose responses may be served from the cache.
CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
# Methods a retry cannot make happen twice (RFC 9110, 9.2.2): the others are retried only when the
# request surely never reached the upstream, unless it carries an Idempotency-Key or says idempotent=True.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def raise_for_category(response: httpx.Response, integration: str, url_shown: str | None = None) -> httpx.Response:
    """Return a successful response; raise the ResilienceError an unsuccessful one stands for.

    ``url_shown`` stands for the request's URL in the error when the URL is a secret (a Slack webhook's).
    """
    category = category_for_status(response.status_code)
    if category is None:
        return response
    request = response.request
    raise ResilienceError(
        category,
        f"{request.method} {url_shown or request.url} returned {response.status_code} {response.reason_phrase}".strip(),
        integration=integration,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        status=response.status_code,
        body=response.text[:500],
    )


_DEAD_LETTER = "resilience.dead_letter"  # request extension carrying the request's DeadLetter


def attempt_timeout(policy: Policy | None, budget: float | None) -> dict | None:
    """httpx's timeout extension for one attempt of ``policy``'s integration: each phase bounded
    by its ``connect_timeout_ms``, ``read_timeout_ms`` and ``write_timeout_ms`` (when set) and by
    the attempt's time left; waiting for a pooled connection by the time left alone."""
    if budget is None:
        return None
    # the dict httpx.Timeout(...).as_dict() gives, built directly: a Timeout per attempt costs 0.5 us
    if policy is None or (policy.connect_timeout_ms is None and policy.read_timeout_ms is None
                          and policy.write_timeout_ms is None):  # no phase limit: the time left bounds each
        return {"connect": budget, "read": budget, "write": budget, "pool": budget}
    return {"connect": _phase(policy.connect_timeout_ms, budget), "read": _phase(policy.read_timeout_ms, budget),
            "write": _phase(policy.write_timeout_ms, budget), "pool": budget}


def _phase(limit_ms: int | None, budget: float) -> float:
    return budget if limit_ms is None else min(limit_ms / 1000, budget)


def _read_deadline(budget: float | None) -> float | None:
    return None if budget is None else time.monotonic() + budget


def _too_late(deadline: float | None, request: httpx.Request) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise httpx.ReadTimeout("the response did not arrive within the attempt's timeout", request=request)


def _complete(response: httpx.Response, request: httpx.Request, raw: bytes) -> httpx.Response:
    complete = httpx.Response(response.status_code, headers=response.headers, content=raw, request=request,
                              extensions=response.extensions)
    complete.read()
    return complete


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
            _too_late(deadline, request)
    finally:
        response.close()
    return _complete(response, request, bytes(raw))


async def aread_within(response: httpx.Response, request: httpx.Request, deadline: float | None) -> httpx.Response:
    """``read_within`` for the async client."""
    raw = bytearray()
    try:
        async for chunk in response.aiter_raw():
            raw += chunk
            _too_late(deadline, request)
    finally:
        await response.aclose()
    return _complete(response, request, bytes(raw))


_CALL_OPTIONS = "resilience.call_options"  # request extension carrying the request's CallOptions
_IDEMPOTENT = "resilience.idempotent"  # request extension: the caller says a retry is safe


def _with_extras(kwargs: dict, dead_letter, call_options, idempotent) -> dict:
    """httpx's request arguments with ours carried in the request's extensions."""
    extras = {}
    if dead_letter is not None:
        extras[_DEAD_LETTER] = dead_letter
    if call_options is not None:
        extras[_CALL_OPTIONS] = checked_options(call_options)
    if idempotent is not None:
        if not isinstance(idempotent, bool):
            raise TypeError(f"idempotent must be True or False, got {idempotent!r}")
        extras[_IDEMPOTENT] = idempotent
    if extras:
        kwargs["extensions"] = {**(kwargs.get("extensions") or {}), **extras}
    return kwargs


def _never_sent(error: ResilienceError) -> bool:
    """Whether a failed attempt surely did not reach the upstream's application: a retry cannot repeat it.

    Connecting failed or timed out, no pooled connection came free, or the upstream answered 429
    (it refused the request unprocessed).
    """
    return error.category is ErrorCategory.RATE_LIMIT or isinstance(
        error.__cause__, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def _options_for(request: httpx.Request) -> CallOptions | None:
    """The request's CallOptions, narrowed for a method a retry could repeat (POST, PATCH)."""
    options = request.extensions.get(_CALL_OPTIONS)
    safe = request.extensions.get(_IDEMPOTENT)
    if safe is None:
        safe = request.method in IDEMPOTENT_METHODS or "idempotency-key" in request.headers
    if safe:
        return options
    if options is None:
        return _UNSENT_ONLY
    if options.retry_if_error is None:
        return dataclasses.replace(options, retry_if_error=_never_sent, hedge=False)
    asked = options.retry_if_error
    return dataclasses.replace(options, retry_if_error=lambda error: _never_sent(error) and asked(error), hedge=False)


# a request a second copy could repeat: retried only if it never left, never hedged
_UNSENT_ONLY = CallOptions(retry_if_error=_never_sent, hedge=False)


def _refuse_streaming(stream: bool) -> None:
    if stream:
        raise ValueError("integrations.http.Client reads whole responses: streaming cannot be retried or cached")


def _cache_key(policy: Policy | None, request: httpx.Request, fallbacks: tuple):
    if policy is not None and policy.cache_ttl_s <= 0 and not fallbacks:
        return False  # nothing is cached nor kept for a fallback: no key to build
    if request.method in CACHEABLE_METHODS:
        return {"method": request.method, "url": str(request.url), "headers": sorted(request.headers.items())}
    return False  # a POST's response is never served to another POST


# httpx.Client's options that build its default transport: the deadline transport takes the same
_TRANSPORT_OPTIONS = ("verify", "cert", "trust_env", "http1", "http2", "limits")


class Client(httpx.Client):
    """An httpx.Client whose requests go through the integration's pipeline.

    Unless given a ``transport`` of its own, it sends on a DeadlineTransport (http_deadline.py):
    every socket operation ends by the attempt's deadline, so attempts run in the caller's thread,
    without the hand-off to a worker thread that ``timeout_enforcement="thread"`` costs other
    operations. A request through any other transport (one given, or an environment proxy's)
    runs as the integration's ``timeout_enforcement`` says.
    """

    def __init__(self, integration: str, *, fallbacks=(), **kwargs) -> None:
        if kwargs.get("transport") is None:
            kwargs["transport"] = DeadlineTransport(**{option: kwargs[option] for option in _TRANSPORT_OPTIONS
                                                       if option in kwargs})
        super().__init__(**kwargs)
        self.integration = integration
        self.fallbacks = tuple(fallbacks)

    def request(self, method: str, url, *, dead_letter=None, call_options: CallOptions | None = None,
                idempotent: bool | None = None, **kwargs) -> httpx.Response:
        """httpx's ``request``, plus ``dead_letter=DeadLetter(...)``: kept if the request finally fails;
        ``call_options``: this request's overrides (CallOptions); ``idempotent=True``: a POST or PATCH
        that may be retried like a GET (an ``Idempotency-Key`` header says so too).

            client.request("POST", "/charges", json=order, dead_letter=DeadLetter("billing.charge", order))
        """
        return super().request(method, url, **_with_extras(kwargs, dead_letter, call_options, idempotent))

    def send(self, request: httpx.Request, *, stream: bool = False, **kwargs) -> httpx.Response:
        _refuse_streaming(stream)
        # httpx's _transport_for_url, without its URL matching when nothing is mounted (the usual case)
        transport = self._transport_for_url(request.url) if self._mounts else self._transport
        enforced = isinstance(transport, DeadlineTransport)
        engine = get_engine()
        policy = engine.registry.get(self.integration)  # the policy the call runs under
        parent_send = super().send
        integration = self.integration

        def attempt() -> httpx.Response:
            budget = attempt_time_left()
            if budget is not None:
                request.extensions = {**request.extensions, "timeout": attempt_timeout(policy, budget)}
            if enforced:  # every read of the body ends by the deadline already: httpx reads it as usual
                response = parent_send(request, **kwargs)
            else:
                response = read_within(parent_send(request, stream=True, **kwargs), request, _read_deadline(budget))
            return raise_for_category(response, integration)

        result = engine.call(integration, attempt, cache_key=_cache_key(policy, request, self.fallbacks),
                             fallbacks=self.fallbacks, dead_letter=request.extensions.get(_DEAD_LETTER),
                             enforces_deadline=enforced, call_options=_options_for(request), policy=policy)
        return result.unwrap()


class AsyncClient(httpx.AsyncClient):
    """The same as Client, on httpx.AsyncClient: ``await client.get(...)`` under ``aexecute``.

    Each attempt is a coroutine, cancelled at its timeout whatever the integration's
    ``timeout_enforcement`` (no thread is needed to stop waiting for it).
    """

    def __init__(self, integration: str, *, fallbacks=(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.integration = integration
        self.fallbacks = tuple(fallbacks)

    async def request(self, method: str, url, *, dead_letter=None, call_options: CallOptions | None = None,
                      idempotent: bool | None = None, **kwargs) -> httpx.Response:
        """httpx's ``request``, plus ``dead_letter``, ``call_options`` and ``idempotent``, as Client.request."""
        return await super().request(method, url, **_with_extras(kwargs, dead_letter, call_options, idempotent))

    async def send(self, request: httpx.Request, *, stream: bool = False, **kwargs) -> httpx.Response:
        _refuse_streaming(stream)

        async def attempt() -> httpx.Response:
            budget = attempt_time_left()
            # the policy aexecute loaded when the call began: no query here
            timeout = attempt_timeout(get_engine().registry.cached(self.integration), budget)
            if timeout is not None:
                request.extensions = {**request.extensions, "timeout": timeout}
            response = await super(AsyncClient, self).send(request, stream=True, **kwargs)
            complete = await aread_within(response, request, _read_deadline(budget))
            return raise_for_category(complete, self.integration)

        engine = get_engine()
        result = await engine.aexecute(self.integration, attempt,
                                       cache_key=_cache_key(engine.registry.cached(self.integration), request,
                                                            self.fallbacks),
                                       fallbacks=self.fallbacks, dead_letter=request.extensions.get(_DEAD_LETTER),
                                       call_options=_options_for(request))
        return result.unwrap()
