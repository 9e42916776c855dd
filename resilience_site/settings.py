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

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE_WORDS = {"1", "true", "yes"}
_FALSE_WORDS = {"0", "false", "no"}
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def env_str(name, default=""):
    """The variable's value, stripped; unset or blank gives the default."""
    value = os.environ.get(name, "").strip()
    return value or default


def env_bool(name, default):
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


def env_int(name, default, minimum=0):
    raw = env_str(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer; got {raw!r}.") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}; got {value}.")
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
    # Right inside SecurityMiddleware, so every response from below (a 403, a 429) carries it.
    "resilience_site.inbound.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # Inbound protection (resilience_site/inbound.py) comes last: after authentication, since the
    # rate limit's client is the token or the user; inside PrometheusAfterMiddleware, so 403s and
    # 429s are counted by status; and inside the header middlewares above, so they carry HSTS,
    # CSP and X-Frame-Options. A refused admin address spends no rate-limit budget.
    "resilience_site.inbound.AdminAllowlistMiddleware",
    "resilience_site.inbound.RateLimitMiddleware",
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

if REDIS_URL:
    CACHES = {
        "default": {
            # django_redis's backend, counting gets, hits and misses for Prometheus.
            "BACKEND": "django_prometheus.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "resilience",
            "OPTIONS": {
                # Fail fast when Redis is away so callers fall back to
                # per-process state instead of hanging on a dead socket.
                "SOCKET_CONNECT_TIMEOUT": 2,
                "SOCKET_TIMEOUT": 2,
            },
        },
    }
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
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"

# Authentication and API

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # DRF's, reusing the token lookup the rate limiter made for the same request
        "resilience_site.inbound.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    # ?page= and ?page_size= (at most integrations.api_common.MAX_PAGE_SIZE) on list endpoints.
    "DEFAULT_PAGINATION_CLASS": "integrations.api_common.Pagination",
    "PAGE_SIZE": 50,
    # Errors as {"error": {"code", "message", ...}} (CONTRACT.md).
    "EXCEPTION_HANDLER": "integrations.api_common.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_METADATA_CLASS": "integrations.api_common.Metadata",  # OPTIONS
}

# The OpenAPI 3 schema (/api/schema/) and Swagger UI (/api/docs/); docs/api.md.
SPECTACULAR_SETTINGS = {
    "TITLE": "Resilience control plane API",
    "DESCRIPTION": "Operate the integrations' breakers, quotas, caches, dead letters, alerts and watchdog. "
                   "Reads need a staff user; changes need a staff user with the model permission.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Like every read of the API, the schema needs a staff user.
    "SERVE_PERMISSIONS": ["integrations.api_common.StaffReadsModelPermissionActs"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # One name per choice set that several fields share.
    "ENUM_NAME_OVERRIDES": {
        "IntegrationKindEnum": "integrations.resilience.policy.KINDS",
        "BreakerStateEnum": "integrations.resilience.breaker.STATES",
        "BreakerModeEnum": "integrations.models.Integration.MODE_CHOICES",
        "LevelEnum": "integrations.api.LEVELS",  # quota levels and the watchdog's status: healthy, warning, critical
        "AlertKindEnum": "monitoring.models.Alert.KIND_CHOICES",
        "AlertStatusEnum": "monitoring.models.Alert.STATUS_CHOICES",
        "DeadLetterStatusEnum": "integrations.dlq.models.STATUSES",
        "HealthStatusEnum": "resilience_site.api_views.HEALTH_STATUS_CHOICES",
        "CheckStatusEnum": "resilience_site.api_views.CHECK_STATUS_CHOICES",
    },
}

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
# RESILIENCE_ADMIN_ALLOWED_IPS: CIDRs allowed to reach the operations console; empty allows any address.
# RESILIENCE_METRICS_TOKEN: bearer token required on /metrics; empty leaves it open.
# RESILIENCE_REQUEST_DEADLINE_MS: the longest a request may wait for an integration;
#   `manage.py check` warns when an integration's overall timeout exceeds it.
# RESILIENCE_POLICY_REFRESH_S: how long a process keeps an integration's policy before
#   reloading it (saves in this process refresh it at once).
# RESILIENCE_AUTO_REGISTER: an unknown integration name creates an Integration with the
#   external_api preset instead of raising ImproperlyConfigured.
# RESILIENCE_CACHE_ALIAS: the Django cache that holds cached responses and last known values.
# RESILIENCE_CACHE_STALE_S: how long past its TTL a cached response may still be served
#   by Fallback.cache().
# RESILIENCE_LAST_KNOWN_TTL_S: how long a last known good value is kept for Fallback.last_known().
# RESILIENCE_REDIS_URL: where breaker, quota and rate-limit state is shared by every process
#   and host (default: REDIS_URL); unset, that state is per process.
# RESILIENCE_KEY_PREFIX: the site's prefix on every shared-state key in Redis.
# RESILIENCE_FAULT_INJECTION: operators may inject errors or latency into an integration's
#   calls for a limited time (game days); off by default.

RESILIENCE_ADMIN_ALLOWED_IPS = env_networks("RESILIENCE_ADMIN_ALLOWED_IPS")
RESILIENCE_METRICS_TOKEN = env_str("RESILIENCE_METRICS_TOKEN")
RESILIENCE_REQUEST_DEADLINE_MS = env_int("RESILIENCE_REQUEST_DEADLINE_MS", 60_000, minimum=1)
RESILIENCE_POLICY_REFRESH_S = env_int("RESILIENCE_POLICY_REFRESH_S", 30)
RESILIENCE_AUTO_REGISTER = env_bool("RESILIENCE_AUTO_REGISTER", False)
RESILIENCE_CACHE_ALIAS = env_str("RESILIENCE_CACHE_ALIAS", "default")
RESILIENCE_CACHE_STALE_S = env_int("RESILIENCE_CACHE_STALE_S", 3600)
RESILIENCE_LAST_KNOWN_TTL_S = env_int("RESILIENCE_LAST_KNOWN_TTL_S", 604_800)
RESILIENCE_REDIS_URL = env_str("RESILIENCE_REDIS_URL", REDIS_URL)
RESILIENCE_KEY_PREFIX = env_str("RESILIENCE_KEY_PREFIX", "resilience")
RESILIENCE_FAULT_INJECTION = env_bool("RESILIENCE_FAULT_INJECTION", False)

if RESILIENCE_CACHE_ALIAS not in CACHES:
    raise ImproperlyConfigured(
        f"RESILIENCE_CACHE_ALIAS names the cache {RESILIENCE_CACHE_ALIAS!r}, "
        f"which is not in CACHES ({', '.join(CACHES)})."
    )

# Dead letter queue (integrations.dlq; docs/dlq.md)
#
# RESILIENCE_DLQ_MAX_REDRIVES: redrives of an entry before it is dead, unless its DeadLetter asks otherwise.
# RESILIENCE_DLQ_BACKOFF_BASE_MS, RESILIENCE_DLQ_BACKOFF_MAX_MS: the wait before redrive n + 1 is
#   min(base x 2^(n-1), max), drawn between half and all of it; the first redrive waits base.
# RESILIENCE_DLQ_LEASE_S: how long a worker holds the entries it claimed (at least the integration's
#   overall timeout plus 5 s); a crashed worker's entries are redriven once it has passed.
# RESILIENCE_DLQ_RATE_PER_MINUTE: entries redriven per integration per minute; 0: no cap.
# RESILIENCE_DLQ_BATCH_SIZE: entries claimed at once by a redrive.
# RESILIENCE_DLQ_REDRIVE_EVERY_MIN: how often the scheduled redrive (dlq.redrive) runs.
# RESILIENCE_DLQ_HANDLER_MODULES: comma-separated modules that register dead letter handlers,
#   imported at start-up besides each app's dead_letters module.
# RESILIENCE_DLQ_SPOOL_DIR: where a dead letter the database refused (outside the caller's
#   transaction) waits on local disk until it can be stored (integrations/dlq/spool.py); empty:
#   not spooled, only logged for recovery by hand.

RESILIENCE_DLQ_MAX_REDRIVES = env_int("RESILIENCE_DLQ_MAX_REDRIVES", 10, minimum=1)
RESILIENCE_DLQ_BACKOFF_BASE_MS = env_int("RESILIENCE_DLQ_BACKOFF_BASE_MS", 60_000, minimum=1)
RESILIENCE_DLQ_BACKOFF_MAX_MS = env_int("RESILIENCE_DLQ_BACKOFF_MAX_MS", 6 * 3_600_000, minimum=1)
RESILIENCE_DLQ_LEASE_S = env_int("RESILIENCE_DLQ_LEASE_S", 300, minimum=1)
RESILIENCE_DLQ_RATE_PER_MINUTE = env_int("RESILIENCE_DLQ_RATE_PER_MINUTE", 600)
RESILIENCE_DLQ_BATCH_SIZE = env_int("RESILIENCE_DLQ_BATCH_SIZE", 100, minimum=1)
RESILIENCE_DLQ_REDRIVE_EVERY_MIN = env_int("RESILIENCE_DLQ_REDRIVE_EVERY_MIN", 5, minimum=1)
RESILIENCE_DLQ_HANDLER_MODULES = env_list("RESILIENCE_DLQ_HANDLER_MODULES")
RESILIENCE_DLQ_SPOOL_DIR = env_str("RESILIENCE_DLQ_SPOOL_DIR", str(BASE_DIR / "var" / "dlq-spool"))

if RESILIENCE_DLQ_BACKOFF_BASE_MS > RESILIENCE_DLQ_BACKOFF_MAX_MS:
    raise ImproperlyConfigured(
        f"RESILIENCE_DLQ_BACKOFF_BASE_MS ({RESILIENCE_DLQ_BACKOFF_BASE_MS}) must not exceed "
        f"RESILIENCE_DLQ_BACKOFF_MAX_MS ({RESILIENCE_DLQ_BACKOFF_MAX_MS})."
    )

# Metrics
#
# PROMETHEUS_MULTIPROC_DIR: where prometheus_client's multiprocess mode keeps each worker's
#   values so /metrics can merge them (deploy/gunicorn.conf.py sets it); prometheus_client
#   reads it too, at import. Unset: one process, metrics in memory (runserver, tests).

PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR")
if PROMETHEUS_MULTIPROC_DIR and not Path(PROMETHEUS_MULTIPROC_DIR).is_dir():
    raise ImproperlyConfigured(
        f"PROMETHEUS_MULTIPROC_DIR names {PROMETHEUS_MULTIPROC_DIR!r}, which is not a directory."
    )

# Monitoring: call statistics and watchdog thresholds (the monitoring app)
#
# RESILIENCE_STATS_FLUSH_S: how often each process writes its buffered call statistics
#   (it also writes them at exit); 0: no background writer, call monitoring.stats.flush().
# RESILIENCE_STATS_RETENTION_DAYS: call statistics and health check results are kept this long.
# RESILIENCE_WATCHDOG_<NAME>: each threshold below, e.g. RESILIENCE_WATCHDOG_MIN_CALLS=50.
#   Rates are over WINDOW_MINUTES (error spike, slow calls, fallbacks, traffic average) or
#   RECENT_MINUTES (unavailable, traffic spike), once MIN_CALLS calls were made; percents are
#   "above" except quota's ("from"). DLQ_PENDING: dead letters still waiting after DLQ_MINUTES.

RESILIENCE_STATS_FLUSH_S = env_int("RESILIENCE_STATS_FLUSH_S", 10)
RESILIENCE_STATS_RETENTION_DAYS = env_int("RESILIENCE_STATS_RETENTION_DAYS", 7, minimum=1)
RESILIENCE_WATCHDOG = {
    name: env_int(f"RESILIENCE_WATCHDOG_{name.upper()}", default, minimum=1)
    for name, default in {
        "window_minutes": 60,
        "recent_minutes": 5,
        "min_calls": 20,
        "error_warning_percent": 30,
        "error_critical_percent": 70,
        "slow_percent": 50,
        "open_minutes": 5,
        "unavailable_failure_percent": 50,
        "unavailable_timeout_percent": 30,
        "quota_warning_percent": 80,
        "quota_critical_percent": 95,
        "dlq_pending": 100,
        "dlq_minutes": 10,
        "traffic_factor": 3,
        "fallback_warning_percent": 50,
        "fallback_critical_percent": 70,
    }.items()
}

# Inbound protection (resilience_site/inbound.py; docs/inbound.md)
#
# RESILIENCE_TRUSTED_PROXIES: comma-separated CIDRs of the proxies in front of the site.
#   X-Forwarded-For is believed only when the peer is one of them, and the client is then its
#   right-most address outside them; empty: the client is the peer. Rate limits and the admin
#   allowlist (RESILIENCE_ADMIN_ALLOWED_IPS) both use this client address.
# RESILIENCE_RATE_LIMITS: the route groups as a JSON object, replacing the defaults below; each
#   {"paths": [prefixes], "methods": [...] (left out: any), "limit": N, "window_s": S}. A request
#   counts against the first group matching its path and method; {} turns rate limits off. Checked
#   when the site starts (an error names the group and the field).
# RESILIENCE_RATE_LIMIT_EXEMPT_PATHS: comma-separated path prefixes never rate limited. By default
#   the health probe and the Prometheus scrape: they come often, from a few addresses, and a 429
#   there would take a healthy instance out of rotation or leave a gap in monitoring.
# RESILIENCE_CONTENT_SECURITY_POLICY: the Content-Security-Policy header of every response.

RESILIENCE_TRUSTED_PROXIES = env_networks("RESILIENCE_TRUSTED_PROXIES")

_DEFAULT_RATE_LIMITS = {
    "api_read": {"paths": ["/api/"], "methods": ["GET", "HEAD", "OPTIONS"], "limit": 100, "window_s": 60},
    "api_write": {"paths": ["/api/"], "methods": ["POST", "PUT", "PATCH", "DELETE"], "limit": 10, "window_s": 60},
    "admin_login": {"paths": ["/admin/login/"], "methods": ["POST"], "limit": 5, "window_s": 60},
}
_rate_limits_json = env_str("RESILIENCE_RATE_LIMITS")
try:
    RESILIENCE_RATE_LIMITS = json.loads(_rate_limits_json) if _rate_limits_json else _DEFAULT_RATE_LIMITS
except json.JSONDecodeError as exc:
    raise ImproperlyConfigured(f"RESILIENCE_RATE_LIMITS must be a JSON object of route groups: {exc}.") from None

RESILIENCE_RATE_LIMIT_EXEMPT_PATHS = env_list("RESILIENCE_RATE_LIMIT_EXEMPT_PATHS", "/api/health/,/metrics")
RESILIENCE_CONTENT_SECURITY_POLICY = env_str(
    "RESILIENCE_CONTENT_SECURITY_POLICY",
    # Everything from this origin only (the admin and the System health page need nothing else).
    # style="" attributes are allowed: admin columns colour their values with them; <style>
    # blocks, inline scripts and event handler attributes are not.
    "default-src 'self'; style-src-attr 'unsafe-inline'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'",
)

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
