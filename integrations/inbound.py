"""Inbound protection: who may reach the site, how often, and the headers every page carries.

Four middlewares, each optional (docs/inbound.md says where each goes in MIDDLEWARE); their
settings and defaults are in integrations/conf.py:

- ``ContentSecurityPolicyMiddleware`` sets RESILIENCE_CONTENT_SECURITY_POLICY on every response.
- ``AdminAllowlistMiddleware`` answers 403 to /admin/ requests from addresses outside
  RESILIENCE_ADMIN_ALLOWED_IPS (empty: no restriction, and the middleware steps aside).
- ``RateLimitMiddleware`` counts each request of a route group (RESILIENCE_RATE_LIMITS) against
  its client's sliding window with the rate limiter of the engine's state store
  (resilience/rate_limit.py): one atomic Lua script in Redis when the site has one, per process
  otherwise, per process again while Redis is down. API responses
  carry X-RateLimit-Limit, -Remaining and -Reset; past the limit the answer is 429 with
  Retry-After and the API's error shape.

- ``RequestDeadlineMiddleware`` gives each request the budget RESILIENCE_REQUEST_BUDGETS sets for
  its path: the guarded calls made while serving it end by then (resilience/options.py).

``@rate_limit("100/m", key=...)`` limits one view with the same limiter, headers and 429.

The client is what RESILIENCE_RATE_LIMIT_CLIENT_KEY's function (an organisation, a tenant) says,
if it says anything, else the API token (hashed: a key never holds a credential), else the
logged-in user, else the address. The token is looked up once per request: ``TokenAuthentication`` (the API's
DRF authentication class) reuses the middleware's lookup instead of querying again. The address
is the peer's, unless the peer is in RESILIENCE_TRUSTED_PROXIES: then X-Forwarded-For is read
from the right. docs/inbound.md gives the reasons.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import ipaddress
import logging
import math
import re
from collections.abc import Callable, Iterable

from asgiref.sync import markcoroutinefunction, sync_to_async

from django.conf import settings
from django.core.exceptions import MiddlewareNotUsed
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden, JsonResponse
from django.utils.html import escape
from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token

from .conf import HTTP_METHOD, RateLimitGroup, app_settings
from .resilience import deadline, get_engine
from .resilience.rate_limit import RateLimit

logger = logging.getLogger(__name__)

# DRF's TokenAuthentication: "Authorization: Token <key>", keyword compared without case.
TOKEN_KEYWORD = "token"
# Where api_token() keeps its lookup on the request: (key, Token or None).
_TOKEN_LOOKUP = "_resilience_api_token"
# An IPv6 client usually holds a whole /64: counting single addresses would give it 2^64 budgets.
IPV6_CLIENT_PREFIX_LENGTH = 64

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- who the client is ---------------------------------------------------------------------


def client_ip(request: HttpRequest, trusted_proxies: tuple[IPNetwork, ...]) -> IPAddress | None:
    """The address of the client that sent the request; None if the server gave no readable one.

    The peer (REMOTE_ADDR), unless it is a trusted proxy. Then X-Forwarded-For is read from the
    right: each proxy appends the address it received the request from, so the first address that
    is not a trusted proxy is the client; whatever lies left of it was written by the client itself
    and proves nothing. A hop that is not an address was not written by a proxy: the reading stops
    at the last address checked.
    """
    peer = _ip(request.META.get("REMOTE_ADDR", ""))
    if peer is None or not _in_networks(peer, trusted_proxies):
        return peer
    client = peer
    for hop in reversed(request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")):
        address = _ip(hop.strip())
        if address is None:
            break
        client = address
        if not _in_networks(address, trusted_proxies):
            break
    return client


@functools.lru_cache(maxsize=4096)  # parsing is most of the cost of a counted request per process
def _ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # a dual-stack server may report an IPv4 client as ::ffff:a.b.c.d
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in_networks(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address in network for network in networks)


KeyFunction = Callable[[HttpRequest], "str | None"]
# A client key becomes part of a Redis key: a bounded string, so a bug cannot write megabyte keys.
MAX_CLIENT_KEY_LENGTH = 200


def rate_limit_client(request: HttpRequest, trusted_proxies: tuple[IPNetwork, ...],
                      key_functions: tuple[KeyFunction, ...] = ()) -> str:
    """Whose budget a request spends: the first key one of ``key_functions`` gives (a view's ``key``,
    then RESILIENCE_RATE_LIMIT_CLIENT_KEY), else ``token:<sha256>``, ``user:<id>`` or ``ip:<address or /64>``.

    Only a token that authenticates an active user counts as one: otherwise a client could send a
    new made-up token with each request and never run out (or guess tokens unhindered).
    """
    for key_function in key_functions:
        key = key_function(request)
        if key is not None:
            return _checked_client_key(key_function, key)
    token = api_token(request)
    if token is not None and token.user.is_active:
        return f"token:{hashlib.sha256(token.key.encode()).hexdigest()}"
    # without a session cookie nobody is logged in: the lazy user (a session load) is left alone
    user = getattr(request, "user", None) if settings.SESSION_COOKIE_NAME in request.COOKIES else None
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    address = client_ip(request, trusted_proxies)
    if address is None:
        return "ip:unknown"
    if address.version == 6:
        return f"ip:{ipaddress.ip_network(f'{address}/{IPV6_CLIENT_PREFIX_LENGTH}', strict=False)}"
    return f"ip:{address}"


def _checked_client_key(key_function: KeyFunction, key) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_CLIENT_KEY_LENGTH:
        name = f"{getattr(key_function, '__module__', '?')}.{getattr(key_function, '__qualname__', key_function)}"
        raise TypeError(f"The client key function {name} returned {key!r:.80}; it must return a non-empty "
                        f"string of at most {MAX_CLIENT_KEY_LENGTH} characters (such as 'org:42') or None.")
    return key


def _api_token_key(request: HttpRequest) -> str | None:
    # META, not request.headers: building that mapping of every header costs more than the rest
    keyword, _space, key = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    key = key.strip()
    return key if keyword.lower() == TOKEN_KEYWORD and key else None


def api_token(request: HttpRequest) -> Token | None:
    """The API token the Authorization header names, with its user; None if there is no such token.

    One query per request at most: the answer is kept on the request for TokenAuthentication.
    """
    key = _api_token_key(request)
    if key is None:
        return None
    looked_up = getattr(request, _TOKEN_LOOKUP, None)
    if looked_up is not None and looked_up[0] == key:
        return looked_up[1]
    token = Token.objects.select_related("user").filter(key=key).first()
    setattr(request, _TOKEN_LOOKUP, (key, token))
    return token


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's TokenAuthentication, answering from RateLimitMiddleware's lookup of the same request.

    Without it an API request with a token would look the token up twice: once to find whose
    rate-limit budget it spends, once to authenticate. Same answers and errors as DRF's class.
    """

    _looked_up: tuple[str, Token | None] | None = None  # the middleware's (key, token), set per request

    def authenticate(self, request):
        self._looked_up = getattr(request._request, _TOKEN_LOOKUP, None)
        return super().authenticate(request)

    def authenticate_credentials(self, key):
        looked_up = self._looked_up
        if looked_up is None or looked_up[0] != key:
            return super().authenticate_credentials(key)
        token = looked_up[1]
        if token is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return (token.user, token)


# -- the middlewares -----------------------------------------------------------------------


class ContentSecurityPolicyMiddleware:
    """RESILIENCE_CONTENT_SECURITY_POLICY on every response that has not set its own."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.policy = app_settings.CONTENT_SECURITY_POLICY

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.setdefault("Content-Security-Policy", self.policy)
        return response


class AdminAllowlistMiddleware:
    """/admin/ only from RESILIENCE_ADMIN_ALLOWED_IPS; other addresses get a plain 403 page."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.allowed_networks = app_settings.ADMIN_ALLOWED_IPS
        if not self.allowed_networks:
            raise MiddlewareNotUsed("RESILIENCE_ADMIN_ALLOWED_IPS is empty: the admin is open to any address.")
        self.trusted_proxies = app_settings.TRUSTED_PROXIES
        self.admin_prefix = app_settings.ADMIN_PREFIX

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info.startswith(self.admin_prefix):
            address = client_ip(request, self.trusted_proxies)
            if address is None or not _in_networks(address, self.allowed_networks):
                logger.info("Refused %s %s from %s: not in RESILIENCE_ADMIN_ALLOWED_IPS.",
                            request.method, request.path, address or "an unknown address")
                return _admin_forbidden(address)
        return self.get_response(request)


def _admin_forbidden(address: IPAddress | None) -> HttpResponseForbidden:
    seen_as = escape(str(address)) if address is not None else "an unknown address"
    return HttpResponseForbidden(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>403 Forbidden</title></head>\n"
        "<body><h1>403 Forbidden</h1>\n"
        f"<p>The operations console cannot be reached from your address ({seen_as}).</p></body></html>\n",
        content_type="text/html; charset=utf-8",
    )


class RequestDeadlineMiddleware:
    """Gives each request the budget RESILIENCE_REQUEST_BUDGETS sets for its path (the longest
    matching prefix): every guarded call made while serving it ends by then (options.deadline),
    and one made after it is refused with TIMEOUT without reaching its upstream. A request no
    prefix matches has no budget. Sync and async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.budgets = app_settings.REQUEST_BUDGETS
        self.is_async = inspect.iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def budget_s(self, path: str) -> float | None:
        return next((budget / 1000 for prefix, budget in self.budgets if path.startswith(prefix)), None)

    def __call__(self, request: HttpRequest):
        if self.is_async:
            return self._acall(request)
        budget = self.budget_s(request.path_info)
        if budget is None:
            return self.get_response(request)
        with deadline(budget):
            return self.get_response(request)

    async def _acall(self, request: HttpRequest):
        budget = self.budget_s(request.path_info)
        if budget is None:
            return await self.get_response(request)
        with deadline(budget):
            return await self.get_response(request)


class RateLimitMiddleware:
    """Sliding-window limits per client per route group; X-RateLimit-* on API responses; 429 past the limit.

    A request counts against the first group (in RESILIENCE_RATE_LIMITS order) that matches its
    path and method; paths under RESILIENCE_RATE_LIMIT_EXEMPT_PATHS and requests no group matches
    are not counted.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.groups = app_settings.RATE_LIMITS
        self.exempt_paths = app_settings.RATE_LIMIT_EXEMPT_PATHS
        self.trusted_proxies = app_settings.TRUSTED_PROXIES
        self.key_functions = _site_key_functions()
        self.api_prefix = app_settings.API_PREFIX

    def __call__(self, request: HttpRequest) -> HttpResponse:
        group = self._group_for(request.path_info, request.method)
        if group is None:
            return self.get_response(request)
        counted = count_request(request, group, self.trusted_proxies, self.key_functions)
        if counted is None:
            return self.get_response(request)
        verdict, reset_s = counted
        response = self.get_response(request) if verdict.allowed else _too_many_requests(group, reset_s)
        if request.path_info.startswith(self.api_prefix):
            set_limit_headers(response, verdict, reset_s)
        return response

    def _group_for(self, path: str, method: str) -> RateLimitGroup | None:
        if path.startswith(self.exempt_paths):
            return None
        return next((group for group in self.groups if group.matches(path, method)), None)


def _site_key_functions() -> tuple[KeyFunction, ...]:
    key_function = app_settings.RATE_LIMIT_CLIENT_KEY
    return () if key_function is None else (key_function,)


def count_request(request: HttpRequest, group: RateLimitGroup, trusted_proxies: tuple[IPNetwork, ...],
                  key_functions: tuple[KeyFunction, ...]) -> tuple[RateLimit, int] | None:
    """Count a request against ``group`` for its client: the limiter's verdict and the whole seconds
    until its reset, or None if the limiter (or a client key function) failed."""
    try:
        limiter = get_engine().store.rate_limiter
        client = rate_limit_client(request, trusted_proxies, key_functions)
        verdict = limiter.hit(f"{group.name}:{client}", group.limit, group.window_s)
        return verdict, seconds_until(verdict.reset_at, limiter.clock.time())
    except Exception:
        # Fail open. A limiter already counts per process while Redis is down, so what lands
        # here is a fault (a script error, the token lookup's database gone, a client key function's
        # bug): refusing every request, or answering 500, because the limiter broke would turn a
        # protection into an outage. The request goes through unlimited and the traceback is logged.
        logger.exception("Rate limit %r not applied to %s %s: the limiter failed.",
                         group.name, request.method, request.path)
        return None


def set_limit_headers(response: HttpResponse, verdict: RateLimit, reset_s: int) -> None:
    """X-RateLimit-* of ``verdict``, unless the response already reports a tighter limit (a view's own)."""
    already = response.get("X-RateLimit-Remaining")
    if already is not None and already.isdigit() and int(already) <= verdict.remaining:
        return
    response["X-RateLimit-Limit"] = str(verdict.limit)
    response["X-RateLimit-Remaining"] = str(verdict.remaining)
    response["X-RateLimit-Reset"] = str(reset_s)


def seconds_until(moment: float, now: float) -> int:
    """Whole seconds from now until ``moment``, rounded up (a client that waits them is in time), at least 1."""
    return max(1, math.ceil(moment - now))


def _too_many_requests(group: RateLimitGroup, retry_after_s: int) -> JsonResponse:
    response = JsonResponse({"error": {
        "code": "rate_limited",
        "message": f"Too many requests: at most {group.limit} per {group.window_s:g} s for {group.name}; "
                   f"retry in {retry_after_s} s.",
        "retry_after": retry_after_s,
    }}, status=429)
    response["Retry-After"] = str(retry_after_s)
    return response


# -- per-view limits -------------------------------------------------------------------------------

# "100/m", "10/s", "1000/5m", "5000/day": a count, then a period made of an optional multiple and a unit
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*")
_UNIT_S = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60,
           "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400}
_VIEW_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def parse_rate(rate: str) -> tuple[int, float]:
    """``"100/m"`` as (100, 60.0): at most 100 requests in any 60 s. ValueError names the argument."""
    match = _RATE.fullmatch(rate) if isinstance(rate, str) else None
    unit_s = _UNIT_S.get(match.group(3)) if match else None
    if match is None or unit_s is None or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
        raise ValueError(f"rate_limit(): the argument 'rate' must be '<count>/<period>' with a count of at least "
                         f"1, such as '100/m', '10/s', '1000/5m' or '5000/d' (periods s, m, h, d); got {rate!r}.")
    return int(match.group(1)), float(int(match.group(2) or 1) * unit_s)


def rate_limit(rate: str, *, key: KeyFunction | None = None, name: str | None = None,
               methods: Iterable[str] | None = None):
    """A view decorator: at most ``rate`` requests per client (``"100/m"``, ``"10/s"``, ``"1000/5m"``).

    Counted by the same limiter as RateLimitMiddleware (in Redis when the site has it, so the
    fleet shares the limit), with the same X-RateLimit-* headers on every response of the view
    and the same 429. ``key(request)`` says whose budget a request spends (a string such as
    ``"org:42"``); None, or no ``key``, falls back to RESILIENCE_RATE_LIMIT_CLIENT_KEY and then the
    token, user or address. ``name`` is the budget's name (views that give the same name share
    it; default: the view's dotted path); ``methods`` limits only those methods (default: all).
    Sync and async views; on a class-based view, decorate ``dispatch`` with ``method_decorator``.
    """
    limit, window_s = parse_rate(rate)
    if key is not None and not callable(key):
        raise TypeError(f"rate_limit(): the argument 'key' must be a function of the request returning its client "
                        f"key or None; got {key!r}.")
    if name is not None and (not isinstance(name, str) or not _VIEW_NAME.fullmatch(name)):
        raise ValueError(f"rate_limit(): the argument 'name' must be made of letters, digits, '.', '_' and '-'; "
                         f"got {name!r}.")
    if methods is not None:
        methods = [methods] if isinstance(methods, str) else list(methods)
        if not methods or not all(isinstance(m, str) and HTTP_METHOD.fullmatch(m.upper()) for m in methods):
            raise ValueError(f"rate_limit(): the argument 'methods' must be HTTP methods such as ['POST']; "
                             f"got {methods!r}.")
        methods = frozenset(m.upper() for m in methods)
    view_keys = () if key is None else (key,)

    def decorator(view):
        # a dot cannot be in a RESILIENCE_RATE_LIMITS group's name: a view's budget never meets a group's
        default_name = f"{getattr(view, '__module__', '')}.{getattr(view, '__qualname__', type(view).__name__)}"
        group = RateLimitGroup(f"view.{name or default_name}", (), methods, limit, window_s)

        def applies(request: HttpRequest) -> bool:
            return methods is None or request.method in methods

        def key_functions() -> tuple[KeyFunction, ...]:
            return view_keys + _site_key_functions()

        def refused(counted: tuple[RateLimit, int]) -> JsonResponse:
            verdict, reset_s = counted
            response = _too_many_requests(group, reset_s)
            set_limit_headers(response, verdict, reset_s)
            return response

        if inspect.iscoroutinefunction(view):
            @functools.wraps(view)
            async def limited_async(request, *args, **kwargs):
                counted = None
                if applies(request):
                    # the limiter may look a token up in the database: not on the event loop
                    counted = await sync_to_async(count_request)(request, group, app_settings.TRUSTED_PROXIES,
                                                                 key_functions())
                if counted is not None and not counted[0].allowed:
                    return refused(counted)
                response = await view(request, *args, **kwargs)
                if counted is not None:
                    set_limit_headers(response, *counted)
                return response

            return limited_async

        @functools.wraps(view)
        def limited(request, *args, **kwargs):
            counted = count_request(request, group, app_settings.TRUSTED_PROXIES, key_functions()) \
                if applies(request) else None
            if counted is not None and not counted[0].allowed:
                return refused(counted)
            response = view(request, *args, **kwargs)
            if counted is not None:
                set_limit_headers(response, *counted)
            return response

        return limited

    return decorator
