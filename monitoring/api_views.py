"""The API's own endpoints above both apps: the public health check, the schema, and JSON errors.

``GET <prefix>/health/`` is public (load balancers and uptime probes call it
without credentials) and names no integration, only counts. Its statuses
are in HEALTH_STATUSES. An open breaker is an upstream's trouble, not this
instance's: it degrades the status but never answers 503, so a load
balancer does not take every instance out of rotation because one partner is down.

Django's own 400, 403, 404 and 500 responses for paths under
RESILIENCE_API_PREFIX (an uncaught exception, say) are in the API's error
shape when the project names these handlers in its root URLconf
(``handler404 = "monitoring.api_views.page_not_found"``...); elsewhere they are
Django's pages. An unknown path under the API is always a JSON 404
(``unknown_endpoint``, the API URLconf's last route).
"""

from __future__ import annotations

from collections import Counter

import redis
from django.db import DatabaseError, connection
from django.http import JsonResponse
from django.urls import Resolver404, resolve
from django.utils import timezone
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import OpenApiResponse
from drf_spectacular.settings import patched_settings
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from integrations.api_common import APIDefaults, api_operation, IsoDateTimeField
from integrations.conf import app_settings
from integrations.models import Integration
from integrations.resilience import get_engine
from integrations.resilience.breaker import HALF_OPEN, OPEN
from integrations.status import PROCESS, SHARED, read_statuses

from .models import CRITICAL, Alert
from .schema_names import ENUM_NAME_OVERRIDES

OK, DEGRADED, DOWN, UNKNOWN = "ok", "degraded", "down", "unknown"
HEALTH_STATUS_CHOICES = (OK, DEGRADED, DOWN)
CHECK_STATUS_CHOICES = (*HEALTH_STATUS_CHOICES, UNKNOWN)
HEALTH_STATUSES = (
    "down (503): the database cannot be reached, so this instance can serve nothing. "
    "degraded (200): a breaker is open or half-open (a forced open counts), a critical alert is active, "
    "or the shared state (Redis) is configured but unreachable (calls go on with per-process state). "
    "ok (200): none of these."
)


# -- the health check ----------------------------------------------------------------------------

def database_check() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return {"status": DOWN, "error": type(exc).__name__}
    return {"status": OK}


def breakers_check() -> dict:
    states = Counter(status.state for status in read_statuses(Integration.objects.all(), figures_minutes=None))
    total = sum(states.values())
    return {"status": DEGRADED if states[OPEN] or states[HALF_OPEN] else OK, "total": total,
            "open": states[OPEN], "half_open": states[HALF_OPEN],
            "scope": SHARED if get_engine().store.shared else PROCESS}


def alerts_check() -> dict:
    counts = Alert.objects.open_counts_by_severity()
    return {"status": DEGRADED if counts[CRITICAL] else OK, **counts}


def shared_state_check() -> dict:
    """Redis, when configured, answers a ping now (the store's own flag only knows the last round trip)."""
    if not get_engine().store.shared:
        return {"status": OK, "configured": False, "available": None}
    try:
        get_engine().store.client.ping()
    except redis.exceptions.RedisError:
        return {"status": DEGRADED, "configured": True, "available": False}
    return {"status": OK, "configured": True, "available": True}


def health() -> dict:
    """Every check and the overall status; the checks that need the database are unknown without it."""
    checks = {"database": database_check()}
    if checks["database"]["status"] == DOWN:
        checks.update(breakers={"status": UNKNOWN}, alerts={"status": UNKNOWN})
    else:
        checks.update(breakers=breakers_check(), alerts=alerts_check())
    checks["shared_state"] = shared_state_check()
    statuses = {check["status"] for check in checks.values()}
    status = DOWN if DOWN in statuses else DEGRADED if DEGRADED in statuses else OK
    return {"status": status, "checked_at": timezone.now(), "checks": checks}


class CheckSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=CHECK_STATUS_CHOICES)


class DatabaseCheckSerializer(CheckSerializer):
    error = serializers.CharField(required=False, help_text="The error's class, when down.")


class BreakersCheckSerializer(CheckSerializer):
    total = serializers.IntegerField(required=False)
    open = serializers.IntegerField(required=False, help_text="Open, forced open included.")
    half_open = serializers.IntegerField(required=False)
    scope = serializers.CharField(required=False, help_text="shared: the fleet's breakers; process: this one's.")


class AlertsCheckSerializer(CheckSerializer):
    warning = serializers.IntegerField(required=False, help_text="Active warnings.")
    critical = serializers.IntegerField(required=False, help_text="Active critical alerts.")


class SharedStateCheckSerializer(CheckSerializer):
    configured = serializers.BooleanField()
    available = serializers.BooleanField(allow_null=True)


class ChecksSerializer(serializers.Serializer):
    database = DatabaseCheckSerializer()
    breakers = BreakersCheckSerializer()
    alerts = AlertsCheckSerializer()
    shared_state = SharedStateCheckSerializer()


class HealthSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=HEALTH_STATUS_CHOICES)
    checked_at = IsoDateTimeField()
    checks = ChecksSerializer()


class HealthView(APIDefaults, APIView):
    authentication_classes = ()  # public: a stale token must not turn a probe into a 401
    permission_classes = (AllowAny,)

    @api_operation(summary="The site's health (public)", auth=[],
                   description=HEALTH_STATUSES,
                   responses={200: OpenApiResponse(HealthSerializer, description="ok or degraded"),
                              503: OpenApiResponse(HealthSerializer, description="down")})
    def get(self, request):
        report = health()
        return Response(HealthSerializer(report).data, status=503 if report["status"] == DOWN else 200,
                        headers={"Cache-Control": "no-store"})


# -- the schema --------------------------------------------------------------------------------

def only_this_api(endpoints, **kwargs):
    """drf-spectacular's preprocessing hook: the schema describes this API's views, not the host's
    (nor the schema and its Swagger UI themselves)."""
    def described(view) -> bool:
        cls = getattr(view, "cls", object)
        return issubclass(cls, APIDefaults) and not issubclass(cls, (SchemaView, SwaggerView))

    return [endpoint for endpoint in endpoints if described(endpoint[3])]


SCHEMA_SETTINGS = {
    "TITLE": "Resilience control plane API",
    "DESCRIPTION": "Operate the integrations' breakers, quotas, caches, dead letters, alerts and watchdog. "
                   "Reads need a staff user; changes need a staff user with the model permission.",
    "VERSION": "1.0.0",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "PREPROCESSING_HOOKS": ["monitoring.api_views.only_this_api"],
    "ENUM_NAME_OVERRIDES": ENUM_NAME_OVERRIDES,
}


class SchemaView(APIDefaults, SpectacularAPIView):
    """The OpenAPI document: YAML, or JSON with ?format=json (or Accept: application/vnd.oai.openapi+json).

    Like every read of the API it needs a staff user; its settings are its own (SCHEMA_SETTINGS),
    not the host's SPECTACULAR_SETTINGS. Its errors are in the API's JSON shape.
    """

    custom_settings = SCHEMA_SETTINGS

    @api_operation(exclude=True)  # the document does not describe itself (nor its Swagger UI, below)
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def handle_exception(self, exc):
        response = super().handle_exception(exc)
        # an error is no OpenAPI document: render it as every other error of the API
        self.request.accepted_renderer, self.request.accepted_media_type = JSONRenderer(), "application/json"
        return response


class SwaggerView(APIDefaults, SpectacularSwaggerSplitView):
    """Swagger UI over SchemaView; its script is served by the view itself and its assets by
    drf-spectacular-sidecar, so the page runs under a same-origin Content-Security-Policy."""

    @api_operation(exclude=True)
    def get(self, request, *args, **kwargs):
        with patched_settings(SCHEMA_SETTINGS):
            return super().get(request, *args, **kwargs)


# -- Django's errors under /api/ in the API's shape --------------------------------------------

def error_response(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message}}, status=status)


def not_found_message(request) -> str:
    message = f"No endpoint at {request.path}."
    if not request.path_info.endswith("/"):
        try:
            endpoint = resolve(request.path_info + "/").func
        except Resolver404:
            endpoint = None
        if endpoint is not None and endpoint is not unknown_endpoint:
            message += f" Did you mean {request.path}/ ?"
    return message


def _json_under_api(status: int, code: str, message: str, html_handler):
    def handler(request, *args, **kwargs):
        if not request.path_info.startswith(app_settings.API_PREFIX):
            return html_handler(request, *args, **kwargs)
        return error_response(status, code, not_found_message(request) if status == 404 else message)

    handler.__name__ = html_handler.__name__
    return handler


bad_request = _json_under_api(400, "bad_request", "The request could not be understood.", defaults.bad_request)
permission_denied = _json_under_api(403, "permission_denied", "You may not do this.", defaults.permission_denied)
page_not_found = _json_under_api(404, "not_found", "", defaults.page_not_found)
server_error = _json_under_api(500, "server_error", "The server failed to answer; the error is logged.",
                               defaults.server_error)


@csrf_exempt
def unknown_endpoint(request, path=""):
    """Any path under the API that no endpoint matched, whatever DEBUG is (Django's debug 404 page is HTML)."""
    return error_response(404, "not_found", not_found_message(request))
