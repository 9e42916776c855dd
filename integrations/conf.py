"""The integrations app's settings: each one's default and its validation, in one place.

In the spirit of DRF's ``api_settings``: code reads ``app_settings.POLICY_REFRESH_S``,
never ``django.conf.settings`` directly, so a host project that sets nothing gets the
embedded behaviour (per-process state, the ``default`` cache). A value is read from the
host's settings on first use and kept until ``setting_changed`` says it changed (as
pytest-django's ``settings`` fixture and ``override_settings`` do).

A bad value raises ImproperlyConfigured naming the setting when it is used, and fails
``manage.py check`` (``AppSettings.check``) before that. docs/reference.md lists them all.

The dead letter queue and monitoring apps declare theirs the same way
(integrations/dlq/conf.py, monitoring/conf.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from django.conf import settings as django_settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

PREFIX = "RESILIENCE_"


@dataclass(frozen=True)
class Setting:
    """One setting: its default and a function that returns the value to use or raises ValueError."""

    default: Any
    validate: Callable[[Any], Any]
    doc: str = ""


class AppSettings:
    """The settings one app reads, with their defaults, validated on first use."""

    def __init__(self, app_label: str, specs: dict[str, Setting], prefix: str = PREFIX, check_series: int = 1) -> None:
        self.app_label = app_label
        self.check_series = check_series
        self.prefix = prefix
        self.specs = specs
        self._values: dict[str, Any] = {}
        setting_changed.connect(self._on_setting_changed, weak=False)

    def setting_name(self, attr: str) -> str:
        return f"{self.prefix}{attr}"

    def __getattr__(self, attr: str) -> Any:
        # only called for names that are not instance attributes: the settings themselves
        values = self.__dict__.get("_values")
        if values is None or attr not in self.__dict__["specs"]:
            raise AttributeError(f"{type(self).__name__} of {self.__dict__.get('app_label')!r} "
                                 f"has no setting {attr!r}")
        if attr not in values:
            values[attr] = self._validated(attr)
        return values[attr]

    def raw(self, attr: str) -> Any:
        """The host's value, or the default when the host does not set it."""
        return getattr(django_settings, self.setting_name(attr), self.specs[attr].default)

    def _validated(self, attr: str) -> Any:
        try:
            return self.specs[attr].validate(self.raw(attr))
        except ValueError as exc:
            message = str(exc)
            separator = "" if message.startswith("[") else " "
            raise ImproperlyConfigured(f"{self.setting_name(attr)}{separator}{message}") from None

    def reload(self) -> None:
        self._values.clear()

    def _on_setting_changed(self, *, setting, **kwargs) -> None:
        if setting.startswith(self.prefix) and setting[len(self.prefix):] in self.specs or setting == "CACHES":
            self.reload()

    def register_check(self) -> None:
        """Have ``manage.py check`` run ``check`` (a function of its own: Django tags what it registers)."""

        def check_settings(app_configs=None, **kwargs):
            return self.check()

        check_settings.__qualname__ = f"check_{self.app_label}_settings"
        checks.register(check_settings, checks.Tags.compatibility)

    def check(self) -> list[checks.CheckMessage]:
        """One error per bad setting, naming it."""
        errors = []
        for number, attr in enumerate(self.specs, start=1):
            try:
                self._validated(attr)
            except ImproperlyConfigured as exc:
                errors.append(checks.Error(str(exc), hint=self.specs[attr].doc or None,
                                           id=f"{self.app_label}.E{self.check_series}{number:02d}"))
        return errors


# -- validators: each returns the value to use or raises ValueError saying what is wanted ---------


def integer(minimum: int = 0) -> Callable[[Any], int]:
    def validate(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, at least {minimum}; got {value!r}.")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}; got {value!r}.")
        return value

    return validate


def boolean(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be True or False; got {value!r}.")
    return value


def tracing_switch(value) -> bool:
    """On needs the optional OpenTelemetry API installed."""
    if boolean(value) and importlib.util.find_spec("opentelemetry") is None:
        raise ValueError('is on, but OpenTelemetry is not installed: pip install "opentelemetry-api>=1.20" '
                         '(the extra django-resilience-control-plane[otel]), or turn it off.')
    return value


def string(*, allow_empty: bool = True, one_line: bool = False) -> Callable[[Any], str]:
    def validate(value):
        if not isinstance(value, str):
            raise ValueError(f"must be a string; got {value!r}.")
        if not allow_empty and not value.strip():
            raise ValueError("must not be empty.")
        if one_line and ("\r" in value or "\n" in value):
            raise ValueError(f"must be one line; got {value!r}.")
        return value.strip() if one_line else value

    return validate


def list_of_strings(value) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"must be a list of strings; got {value!r}.")
    return tuple(value)


def path_prefixes(value) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(prefix, str) and prefix.startswith("/") for prefix in value):
        raise ValueError(f"must be a list of path prefixes starting with '/'; got {value!r}.")
    return tuple(value)


def path_prefix(value) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"must be a path prefix starting with '/'; got {value!r}.")
    return value


def request_budgets(value) -> tuple[tuple[str, int], ...]:
    """{path prefix: milliseconds} as (prefix, ms) pairs, the longest prefix first (the one that applies)."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a dict of path prefix -> milliseconds, such as {{'/api/': 5000}}; got {value!r}.")
    for prefix, budget in value.items():
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ValueError(f"the key {prefix!r} must be a path prefix starting with '/'.")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"the budget of {prefix!r} must be a whole number of milliseconds, at least 1; "
                             f"got {budget!r}.")
    return tuple(sorted(value.items(), key=lambda item: -len(item[0])))


def networks(value) -> tuple:
    # a bare string would be read character by character, and "1" is a valid address
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of CIDRs such as 10.0.0.0/8; got {value!r}.")
    try:
        return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be a list of CIDRs such as 10.0.0.0/8: {exc}.") from None


def cache_alias(value) -> str:
    if not isinstance(value, str) or value not in django_settings.CACHES:
        raise ValueError(f"names the cache {value!r}, which is not in CACHES ({', '.join(django_settings.CACHES)}).")
    return value


def redis_url(value) -> str:
    """A URL of one of the shared store's forms (integrations/resilience/redis_connect.py), or empty."""
    from .resilience.redis_connect import parse_url

    if not isinstance(value, str):
        raise ValueError(f"must be a Redis URL such as redis://127.0.0.1:6379/0, or empty; got {value!r}.")
    value = value.strip()
    if value:
        parse_url(value)
    return value


def redis_explicit(value):
    """The explicit form of the shared store's Redis (a Sentinel service or a Cluster), or {}: the URL's."""
    from .resilience.redis_connect import from_explicit

    if not isinstance(value, dict):
        raise ValueError(f"must be a dict such as {{'sentinels': ['10.0.0.1:26379'], 'service_name': 'mymaster'}} "
                         f"or {{'cluster_nodes': ['10.0.0.1:7000']}}, or empty; got {value!r}.")
    return from_explicit(value) if value else None


def seconds(*, above: float = 0.0) -> Callable[[Any], float]:
    def validate(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not above < value < math.inf:
            raise ValueError(f"must be a number of seconds above {above:g}; got {value!r}.")
        return float(value)

    return validate


def rate_limits(value):
    return rate_limit_groups(value)  # raises ImproperlyConfigured naming the group and the field


def client_key_function(value) -> Callable | None:
    """The dotted path of a function of the request returning its client key (or None); empty: None.

    Imported here, so a typo or a function of the wrong shape fails ``check`` and the start-up
    rather than every request.
    """
    if not isinstance(value, str):
        raise ValueError(f"must be the dotted path of a function such as 'myproject.limits.organisation', "
                         f"or empty; got {value!r}.")
    value = value.strip()
    if not value:
        return None
    try:
        function = import_string(value)
    except ImportError as exc:
        raise ValueError(f"names {value!r}, which cannot be imported: {exc}.") from None
    if not callable(function):
        raise ValueError(f"names {value!r}, which is not callable.")
    try:
        inspect.signature(function).bind(object())
    except TypeError:
        raise ValueError(f"names {value!r}, which cannot be called with one argument, the request.") from None
    except ValueError:
        pass  # no signature to read (a builtin): it is tried on the first request
    return function


_GROUP_FIELDS = ("paths", "methods", "limit", "window_s")
_REQUIRED_GROUP_FIELDS = ("paths", "limit", "window_s")
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]+")  # it becomes part of a Redis key
HTTP_METHOD = re.compile(r"[A-Z]+")


# -- inbound rate-limit groups (RESILIENCE_RATE_LIMITS), parsed here so that the check names the field --


@dataclass(frozen=True)
class RateLimitGroup:
    """Requests whose path starts with one of ``paths`` and whose method is in ``methods``
    (None: any method): at most ``limit`` per client in any ``window_s`` seconds."""

    name: str
    paths: tuple[str, ...]
    methods: frozenset[str] | None
    limit: int
    window_s: float

    def matches(self, path: str, method: str) -> bool:
        return path.startswith(self.paths) and (self.methods is None or method in self.methods)


def rate_limit_groups(config) -> tuple[RateLimitGroup, ...]:
    """RESILIENCE_RATE_LIMITS as groups, in its order; ImproperlyConfigured names the group and the field."""
    if not isinstance(config, dict):
        raise ImproperlyConfigured(
            f"RESILIENCE_RATE_LIMITS must be a dict of route groups; got {type(config).__name__}.")
    return tuple(_rate_limit_group(name, spec) for name, spec in config.items())


def _rate_limit_group(name, spec) -> RateLimitGroup:
    where = f"RESILIENCE_RATE_LIMITS[{name!r}]"
    if not isinstance(name, str) or not _GROUP_NAME.fullmatch(name):
        raise ImproperlyConfigured(f"{where}: a group's name is made of letters, digits, '_' and '-'.")
    if not isinstance(spec, dict):
        raise ImproperlyConfigured(
            f"{where} must be a dict with paths, limit, window_s and optionally methods; "
            f"got {type(spec).__name__}.")
    unknown = sorted(str(field) for field in spec if field not in _GROUP_FIELDS)
    if unknown:
        raise ImproperlyConfigured(
            f"{where}['{unknown[0]}'] is not a field of a group; the fields are {', '.join(_GROUP_FIELDS)}.")
    for field in _REQUIRED_GROUP_FIELDS:
        if field not in spec:
            raise ImproperlyConfigured(f"{where}['{field}'] is required.")

    paths = spec["paths"]
    if not _is_list_of_str(paths) or not all(path.startswith("/") for path in paths):
        raise ImproperlyConfigured(
            f"{where}['paths'] must be a non-empty list of path prefixes starting with '/'; got {paths!r}.")
    methods = spec.get("methods")
    if methods is not None:
        if not _is_list_of_str(methods) or not all(HTTP_METHOD.fullmatch(m.upper()) for m in methods):
            raise ImproperlyConfigured(
                f"{where}['methods'] must be a non-empty list of HTTP methods such as GET or POST; "
                f"got {methods!r}.")
        methods = frozenset(method.upper() for method in methods)
    limit = spec["limit"]
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ImproperlyConfigured(f"{where}['limit'] must be a whole number of requests, at least 1; got {limit!r}.")
    window_s = spec["window_s"]
    if isinstance(window_s, bool) or not isinstance(window_s, (int, float)) or not 0 < window_s < math.inf:
        raise ImproperlyConfigured(f"{where}['window_s'] must be a number of seconds above 0; got {window_s!r}.")
    return RateLimitGroup(name, tuple(paths), methods, limit, float(window_s))


def _is_list_of_str(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, str) for item in value)


DEFAULT_RATE_LIMITS = {
    "api_read": {"paths": ["/api/"], "methods": ["GET", "HEAD", "OPTIONS"], "limit": 100, "window_s": 60},
    "api_write": {"paths": ["/api/"], "methods": ["POST", "PUT", "PATCH", "DELETE"], "limit": 10, "window_s": 60},
    "admin_login": {"paths": ["/admin/login/"], "methods": ["POST"], "limit": 5, "window_s": 60},
}

DEFAULT_CONTENT_SECURITY_POLICY = (
    # Everything from this origin only (the admin and the System health page need nothing else).
    # style="" attributes are allowed: admin columns colour their values with them; <style>
    # blocks, inline scripts and event handler attributes are not.
    "default-src 'self'; style-src-attr 'unsafe-inline'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)

app_settings = AppSettings("integrations", {
    "POLICY_REFRESH_S": Setting(30, integer(0), "How long a process keeps a policy before reloading it."),
    "AUTO_REGISTER": Setting(False, boolean, "An unknown integration name creates one with the external_api preset."),
    "CACHE_ALIAS": Setting("default", cache_alias, "The Django cache holding cached responses and last known values."),
    "CACHE_STALE_S": Setting(3600, integer(0), "How long past its TTL a cached response may be served."),
    "LAST_KNOWN_TTL_S": Setting(604_800, integer(0), "How long a last known good value is kept."),
    "REDIS_URL": Setting("", redis_url, "Where breaker, quota and rate-limit state is shared; empty: per process."),
    "KEY_PREFIX": Setting("resilience", string(allow_empty=False), "The prefix of every shared-state key."),
    "FAULT_INJECTION": Setting(False, boolean, "Operators may inject faults into calls (game days)."),
    "TRACING": Setting(False, tracing_switch, "An OpenTelemetry span per guarded call and per attempt."),
    "REQUEST_DEADLINE_MS": Setting(60_000, integer(1), "check warns when an overall timeout exceeds it."),
    # inbound protection (integrations/inbound.py): read only where its middlewares are installed
    "RATE_LIMITS": Setting(DEFAULT_RATE_LIMITS, rate_limits, "Route groups: {name: {paths, methods, limit, window_s}}."),
    "RATE_LIMIT_EXEMPT_PATHS": Setting(["/api/health/", "/metrics"], path_prefixes, "Paths never rate limited."),
    "ADMIN_ALLOWED_IPS": Setting([], networks, "CIDRs allowed to reach the admin; empty: any address."),
    "TRUSTED_PROXIES": Setting([], networks, "CIDRs of the proxies whose X-Forwarded-For is believed."),
    "CONTENT_SECURITY_POLICY": Setting(DEFAULT_CONTENT_SECURITY_POLICY, string(allow_empty=False, one_line=True),
                                       "The Content-Security-Policy header of every response."),
    "API_PREFIX": Setting("/api/", path_prefix, "Where the HTTP API is mounted: its responses carry X-RateLimit-*."),
    "ADMIN_PREFIX": Setting("/admin/", path_prefix, "Where the admin is mounted: the allowlist guards it."),
    # last, so that the check ids of the settings above stay what they were
    "RATE_LIMIT_CLIENT_KEY": Setting("", client_key_function,
                                     "Dotted path of a function(request) -> client key or None (the default chain)."),
    "REQUEST_BUDGETS": Setting({}, request_budgets, "RequestDeadlineMiddleware: {path prefix: ms} a request may "
                                                     "spend; its guarded calls end by then."),
    # the shared store's Redis besides REDIS_URL (docs/shared-state.md, "Topologies")
    "REDIS": Setting({}, redis_explicit, "A Sentinel service or a Cluster named by its parts, instead of the URL: "
                                         "{sentinels, service_name} or {cluster_nodes}, and db, username, password, "
                                         "sentinel_password, tls, ca_certs."),
    "REDIS_CONNECT_TIMEOUT_S": Setting(0.25, seconds(), "The longest the shared store waits to connect to Redis."),
    "REDIS_SOCKET_TIMEOUT_S": Setting(0.5, seconds(), "The longest the shared store waits for a Redis reply; then "
                                                      "the call goes on with per-process state."),
})
