"""Settings for the resilience control plane.

This module is the only place that reads the environment; every variable it
reads is listed in the Configuration table of README.md. Unset variables give
the embedded development setup: SQLite, local-memory cache, django-q on the ORM.
"""

import ipaddress
import json
import os
import tempfile
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from monitoring.schema_names import ENUM_NAME_OVERRIDES

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE_WORDS = {"1", "true", "yes"}
_FALSE_WORDS = {"0", "false", "no"}
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def env_str(name, default=""):
    """The variable's value, stripped; unset or blank gives the default."""
    value = os.environ.get(name, "").strip()
    return value or default


def env_bool(name, default=None):
    raw = env_str(name)
    if not raw:
        return default
    word = raw.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ImproperlyConfigured(
        f"{name} must be one of 1, 0, true, false, yes, no; got {raw!r}."
    )


def env_int(name, default=None):
    raw = env_str(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer; got {raw!r}.") from None
    return value


def env_list(name, default=""):
    """A comma-separated variable as a list, without blank items."""
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def env_networks(name):
    """Comma-separated CIDRs, validated now so a typo cannot open the door later."""
    networks = []
    for item in env_list(name):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ImproperlyConfigured(
                f"{name} must be comma-separated CIDRs such as 10.0.0.0/8; got {item!r}."
            ) from None
    return networks


# Core

DEBUG = env_bool("DEBUG", True)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")
    SECRET_KEY = "django-insecure-development-only-never-use-this-key-in-production"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's assets, served from this origin (/api/docs/)
    "django_q",
    "django_prometheus",
    "integrations.apps.IntegrationsConfig",
    "integrations.dlq.apps.DlqConfig",
    "monitoring.apps.MonitoringConfig",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # The request's budget (RESILIENCE_REQUEST_BUDGETS) covers everything below it.
    "integrations.inbound.RequestDeadlineMiddleware",
    # Right inside SecurityMiddleware, so every response from below (a 403, a 429) carries it.
    "integrations.inbound.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # Inbound protection (integrations/inbound.py) comes last: after authentication, since the
    # rate limit's client is the token or the user; inside PrometheusAfterMiddleware, so 403s and
    # 429s are counted by status; and inside the header middlewares above, so they carry HSTS,
    # CSP and X-Frame-Options. A refused admin address spends no rate-limit budget.
    "integrations.inbound.AdminAllowlistMiddleware",
    "integrations.inbound.RateLimitMiddleware",
]

ROOT_URLCONF = "resilience_site.urls"
WSGI_APPLICATION = "resilience_site.wsgi.application"
ASGI_APPLICATION = "resilience_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database and cache

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=60,
        conn_health_checks=True,
    ),
}

# django_prometheus's wrappers of the same backends count connections, queries and errors.
_PROMETHEUS_DB_ENGINES = {
    "django.db.backends.postgresql": "django_prometheus.db.backends.postgresql",
    "django.db.backends.sqlite3": "django_prometheus.db.backends.sqlite3",
}
DATABASES["default"]["ENGINE"] = _PROMETHEUS_DB_ENGINES.get(DATABASES["default"]["ENGINE"],
                                                            DATABASES["default"]["ENGINE"])

# SQLite's test database in a file, not in memory, so processes a test starts (a django-q
# cluster) can share it; named after this process so parallel test runs do not collide.
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["TEST"] = {
        "NAME": str(Path(tempfile.gettempdir()) / f"resilience-test-{os.getpid()}.sqlite3"),
    }
    # Writers take SQLite's lock when their transaction begins and wait up to 20 s for it, so threads
    # and processes writing at once (the demo, the django-q cluster) queue instead of failing with
    # "database is locked" when a read-then-write transaction cannot upgrade its lock.
    DATABASES["default"].setdefault("OPTIONS", {}).update(transaction_mode="IMMEDIATE", timeout=20)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL")


def redis_cache_and_broker(url):
    """The Django cache and the django-q2 broker options on the Redis ``url`` names.

    One server (redis://, rediss://): django-redis and django-q2's redis broker read the URL.
    A Sentinel service (redis+sentinel://): django-redis's SentinelClient, and django-q2 on the
    cache's connection (its ``django_redis`` option), so both follow a failover. A Cluster: neither
    library can use one (django-redis has no cluster client; django-q2's broker reads its stats
    with KEYS and a cross-slot MGET), so it is refused, naming the combinations that work.
    """
    from integrations.resilience.redis_connect import CLUSTER, SENTINEL, parse_url

    try:
        target = parse_url(url)
    except ValueError as exc:
        raise ImproperlyConfigured(f"REDIS_URL {exc}") from None
    # Fail fast when Redis is away so callers fall back to per-process state instead of hanging
    # on a dead socket.
    options = {"SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 2}
    broker = {"redis": url}
    location = url
    if target.form == CLUSTER:
        raise ImproperlyConfigured(
            "REDIS_URL names a Redis Cluster, which the Django cache (django-redis) and django-q2's broker "
            "cannot use. Set RESILIENCE_REDIS_URL to the cluster for the shared state, and REDIS_URL to one "
            "Redis or a Sentinel service for the cache and the broker (or leave it unset: local memory and "
            "the ORM broker); docs/shared-state.md, Topologies.")
    if target.form == SENTINEL:
        credentials = f"{target.username or ''}:{target.password}@" if target.password else ""
        location = f"redis{'s' if target.tls else ''}://{credentials}{target.service_name}/{target.db}"
        options.update({
            "CLIENT_CLASS": "django_redis.client.SentinelClient",
            "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
            "SENTINELS": list(target.nodes),
            "SENTINEL_KWARGS": {"socket_timeout": 2, "socket_connect_timeout": 2,
                                "password": target.sentinel_password, **dict(target.tls_options),
                                **({"ssl": True} if target.tls else {})},
        })
        if target.tls:
            options["CONNECTION_POOL_KWARGS"] = {"ssl": True, **dict(target.tls_options)}
        broker = {"django_redis": "default"}
    cache = {
        # django_redis's backend, counting gets, hits and misses for Prometheus.
        "BACKEND": "django_prometheus.cache.backends.redis.RedisCache",
        "LOCATION": location,
        "KEY_PREFIX": "resilience",
        "OPTIONS": options,
    }
    return cache, broker


if REDIS_URL:
    _REDIS_CACHE, _REDIS_BROKER = redis_cache_and_broker(REDIS_URL)
    CACHES = {"default": _REDIS_CACHE}
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "resilience",
        },
    }

# Background tasks (django-q2). A task is retried only after its timeout has
# expired, so retry must stay above timeout.

Q_CLUSTER = {
    "name": "resilience",
    "workers": 2,
    "timeout": 120,
    "retry": 180,
    "catch_up": False,
    # django-q2 reads Q_CLUSTER_NAME (a separate queue, e.g. per test run) only when this key exists.
    "ALT_CLUSTERS": {},
}
if REDIS_URL:
    Q_CLUSTER.update(_REDIS_BROKER)
else:
    Q_CLUSTER["orm"] = "default"

# Authentication and API

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# The API's views carry their own DRF configuration (integrations.api_common.APIDefaults) and
# schema settings (monitoring.api_views.SCHEMA_SETTINGS): a project's REST_FRAMEWORK and
# SPECTACULAR_SETTINGS are its own. This site names the API's choice sets, so that drf-spectacular's
# own `check --deploy` (which generates the whole site's schema with these settings) is clean.

SPECTACULAR_SETTINGS = {"ENUM_NAME_OVERRIDES": ENUM_NAME_OVERRIDES, "COMPONENT_SPLIT_REQUEST": True}

# Internationalization and static files

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# Logging

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in _LOG_LEVELS:
    raise ImproperlyConfigured(
        f"LOG_LEVEL must be one of {', '.join(sorted(_LOG_LEVELS))}; got {LOG_LEVEL!r}."
    )

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "loggers": {
        "integrations": {"handlers": ["console"], "level": LOG_LEVEL},
        "monitoring": {"handlers": ["console"], "level": LOG_LEVEL},
    },
}

# Resilience
#
# Every RESILIENCE_* setting has its default and its validation in the app that reads it
# (integrations/conf.py, integrations/dlq/conf.py, monitoring/conf.py; docs/reference.md lists
# them): this site only maps the environment onto them. A variable left unset keeps the app's
# default, and a bad value fails `manage.py check` (and the first use) naming the setting.

_ENV_SETTINGS = {
    # integrations
    "RESILIENCE_POLICY_REFRESH_S": env_int,
    "RESILIENCE_AUTO_REGISTER": env_bool,
    "RESILIENCE_CACHE_ALIAS": env_str,
    "RESILIENCE_CACHE_STALE_S": env_int,
    "RESILIENCE_LAST_KNOWN_TTL_S": env_int,
    "RESILIENCE_KEY_PREFIX": env_str,
    "RESILIENCE_FAULT_INJECTION": env_bool,
    "RESILIENCE_TRACING": env_bool,
    "RESILIENCE_REQUEST_DEADLINE_MS": env_int,
    # inbound protection (integrations/inbound.py; docs/inbound.md)
    "RESILIENCE_ADMIN_ALLOWED_IPS": env_networks,
    "RESILIENCE_TRUSTED_PROXIES": env_networks,
    "RESILIENCE_RATE_LIMIT_EXEMPT_PATHS": env_list,
    "RESILIENCE_RATE_LIMIT_CLIENT_KEY": env_str,
    "RESILIENCE_CONTENT_SECURITY_POLICY": env_str,
    "RESILIENCE_API_PREFIX": env_str,
    "RESILIENCE_ADMIN_PREFIX": env_str,
    # dead letter queue (docs/dlq.md)
    "RESILIENCE_DLQ_MAX_REDRIVES": env_int,
    "RESILIENCE_DLQ_BACKOFF_BASE_MS": env_int,
    "RESILIENCE_DLQ_BACKOFF_MAX_MS": env_int,
    "RESILIENCE_DLQ_LEASE_S": env_int,
    "RESILIENCE_DLQ_RATE_PER_MINUTE": env_int,
    "RESILIENCE_DLQ_BATCH_SIZE": env_int,
    "RESILIENCE_DLQ_REDRIVE_EVERY_MIN": env_int,
    "RESILIENCE_DLQ_HANDLER_MODULES": env_list,
    # monitoring
    "RESILIENCE_METRICS_TOKEN": env_str,
    "RESILIENCE_STATS_FLUSH_S": env_int,
    "RESILIENCE_STATS_RETENTION_DAYS": env_int,
    # prometheus_client's multiprocess directory (deploy/gunicorn.conf.py sets it)
    "PROMETHEUS_MULTIPROC_DIR": env_str,
}
for _name, _read in _ENV_SETTINGS.items():
    if env_str(_name):
        globals()[_name] = _read(_name)

# The shared state follows the site's Redis unless RESILIENCE_REDIS_URL names another (a Cluster,
# say), or RESILIENCE_REDIS (JSON) names a Sentinel service or a Cluster by its parts.
RESILIENCE_REDIS_URL = env_str("RESILIENCE_REDIS_URL", REDIS_URL)
# This site spools a dead letter the database refused under var/ (the app's default: no spool).
RESILIENCE_DLQ_SPOOL_DIR = env_str("RESILIENCE_DLQ_SPOOL_DIR", str(BASE_DIR / "var" / "dlq-spool"))

# RESILIENCE_WATCHDOG_<NAME>: one watchdog threshold each, e.g. RESILIENCE_WATCHDOG_MIN_CALLS=50.
# (RESILIENCE_WATCHDOG_RULES, user-defined rules, is a list of dicts: settings only, never read here.)
RESILIENCE_WATCHDOG = {
    _key[len("RESILIENCE_WATCHDOG_"):].lower(): env_int(_key)
    for _key in sorted(os.environ)
    if _key.startswith("RESILIENCE_WATCHDOG_") and _key != "RESILIENCE_WATCHDOG_RULES" and env_str(_key)
}



def env_json(name, what):
    """The environment variable ``name`` as JSON; ImproperlyConfigured saying it must be ``what``."""
    try:
        return json.loads(env_str(name))
    except json.JSONDecodeError as exc:
        raise ImproperlyConfigured(f"{name} must be {what}: {exc}.") from None


# RESILIENCE_RATE_LIMITS: the route groups as a JSON object, replacing the defaults.
if env_str("RESILIENCE_RATE_LIMITS"):
    RESILIENCE_RATE_LIMITS = env_json("RESILIENCE_RATE_LIMITS", "a JSON object of route groups")
if env_str("RESILIENCE_REDIS"):
    RESILIENCE_REDIS = env_json("RESILIENCE_REDIS", "a JSON object such as "
                                '{"sentinels": ["10.0.0.1:26379"], "service_name": "mymaster"}')
for _name in ("RESILIENCE_REDIS_CONNECT_TIMEOUT_S", "RESILIENCE_REDIS_SOCKET_TIMEOUT_S"):
    if env_str(_name):
        try:
            globals()[_name] = float(env_str(_name))
        except ValueError:
            raise ImproperlyConfigured(f"{_name} must be a number of seconds; got {env_str(_name)!r}.") from None
# RESILIENCE_REQUEST_BUDGETS: {path prefix: ms}; the guarded calls of a request end by its budget.
if env_str("RESILIENCE_REQUEST_BUDGETS"):
    RESILIENCE_REQUEST_BUDGETS = env_json("RESILIENCE_REQUEST_BUDGETS", "a JSON object of path prefix -> milliseconds")

LOGGING["loggers"]["resilience_site"] = {"handlers": ["console"], "level": LOG_LEVEL}

# Production hardening

if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = 31_536_000
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    # Only the header's "preload" token (check --deploy's W021): the domain joins browsers'
    # preload list only when its owner submits it at hstspreload.org, a lasting step (docs/inbound.md).
    SECURE_HSTS_PRELOAD = True
    SECURE_CONTENT_TYPE_NOSNIFF = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    X_FRAME_OPTIONS = "DENY"
    SECURE_REFERRER_POLICY = "same-origin"
