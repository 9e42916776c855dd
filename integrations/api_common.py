"""What every view of the HTTP API shares (docs/reference.md): the error shape, the permission rule,
and ``APIDefaults``, the DRF configuration each view carries itself so that the host's
REST_FRAMEWORK settings (its authentication, permissions, pagination, error handler) do not change it.

Errors are ``{"error": {"code", "message", ...}}``; a bad input also names
its fields: ``{"error": {"code": "invalid", "message": "limit: ...",
"fields": {"limit": ["..."]}}}``. Reads need a staff user; changes need a
staff user with the model permission. List endpoints are paged the same way
(``Pagination``), and the schema describes errors with ``error_responses``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.metadata import SimpleMetadata
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.settings import api_settings

from .inbound import TokenAuthentication

# What a change needs, by method: this API's POSTs act on existing objects
# (retry, acknowledge, reset), so they need the change permission, not add.
ACTION_BY_METHOD = {"POST": "change", "PUT": "change", "PATCH": "change", "DELETE": "delete"}


def exception_handler(exc, context):
    """DRF's handler (status, headers such as WWW-Authenticate and Retry-After), in the contract's shape."""
    # imported here: rest_framework.views reads DEFAULT_METADATA_CLASS (this module's Metadata) as it is
    # imported, so importing it at the top would make the two modules import each other
    from rest_framework.views import exception_handler as drf_exception_handler

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # not an API error (a bug): Django's 500 handling and logging apply
    response.data = {"error": error_body(exc, response.data)}
    return response


def error_body(exc, data) -> dict:
    if isinstance(exc, exceptions.ValidationError):
        fields = data if isinstance(data, dict) else {"non_field_errors": data}
        fields = {name: [str(message) for message in _as_list(messages)] for name, messages in fields.items()}
        message = "; ".join(f"{name}: {' '.join(messages)}" for name, messages in fields.items())
        return {"code": "invalid", "message": message, "fields": fields}
    detail = getattr(exc, "detail", None)
    body = {"code": getattr(detail, "code", None) or getattr(exc, "default_code", "error"),
            "message": str(detail) if detail is not None else str(exc)}
    wait = getattr(exc, "wait", None)
    if wait is not None:
        body["retry_after"] = wait
    return body


def _as_list(messages) -> list:
    if isinstance(messages, dict):
        return [f"{key}: {' '.join(str(m) for m in _as_list(value))}" for key, value in messages.items()]
    return messages if isinstance(messages, list) else [messages]


class StaffReadsModelPermissionActs(BasePermission):
    """Reads: a staff user. Changes: a staff user with the model's permission for the method.

    The model is the view's ``permission_model`` (or its queryset's model):
    POST, PUT and PATCH need ``<app>.change_<model>``, DELETE ``<app>.delete_<model>``,
    unless the view's ``permission_action`` names the action every change needs.
    Anonymous requests get 401 (the authenticators' challenge), others 403.
    """

    message = "This needs a staff user."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_staff):
            return False
        if request.method in SAFE_METHODS:
            return True
        # a view whose DELETE changes rather than deletes (clearing a cache) says so with permission_action
        action = getattr(view, "permission_action", None) or ACTION_BY_METHOD.get(request.method)
        model = _model_of(view)
        codename = f"{model._meta.app_label}.{action}_{model._meta.model_name}"
        if action is None or not user.has_perm(codename):
            self.message = f"This needs the permission {codename}."
            return False
        return True


def _model_of(view):
    model = getattr(view, "permission_model", None)
    if model is not None:
        return model
    queryset = view.get_queryset() if hasattr(view, "get_queryset") else getattr(view, "queryset", None)
    if queryset is None:
        raise TypeError(f"{type(view).__name__} needs a permission_model or a queryset to check permissions")
    return queryset.model


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer only: not "5", not 5.0, not true."""

    default_error_messages = {"invalid": "Must be an integer."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


def validated(serializer_class, data, *, others: tuple[str, ...] | None = ()) -> dict:
    """``data`` (a body or the query string) checked by ``serializer_class``; a 400 naming the fields if bad.

    A name neither the serializer nor ``others`` (what another part of the view reads: the page
    parameters of a paged list) knows is a 400 naming it too: a misspelt filter must not pass
    for an absent one (``DELETE /api/cache/billing/?kye=x`` would clear every entry), nor a
    misspelt field of a body for a default. ``others=None``: the data also holds parameters
    the view checks elsewhere (the paginator's own check). DRF's ``?format=`` is always known.
    """
    if others is not None and isinstance(data, Mapping):
        format_override = api_settings.URL_FORMAT_OVERRIDE  # None when the host turned ?format= off
        known = {*serializer_class().fields, *others, *([format_override] if format_override else [])}
        unknown = sorted(name for name in data if name not in known)
        if unknown:
            expected = ", ".join(sorted(known)) or "none"
            raise exceptions.ValidationError({name: [f"Unknown parameter; expected one of: {expected}."]
                                              for name in unknown})
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def filtered(queryset, query: dict, lookups: dict[str, str]):
    """``queryset`` narrowed by each checked query parameter given: ``{parameter: field lookup}``."""
    given = {lookup: query[parameter] for parameter, lookup in lookups.items() if parameter in query}
    return queryset.filter(**given) if given else queryset


class IsoDateTimeField(serializers.DateTimeField):
    """A time as the models' ``as_dict()`` write it (``2026-11-23T02:43:51.123456+00:00``), so one
    response never mixes that with DRF's ``...Z``; strings from ``as_dict()`` pass as they are."""

    def to_representation(self, value):
        return value.isoformat() if isinstance(value, datetime) else value


class Conflict(exceptions.APIException):
    """The request is valid but the object's state forbids it now (acknowledging a resolved alert)."""

    status_code = status.HTTP_409_CONFLICT
    default_detail = "The object's current state does not allow this."
    default_code = "conflict"


class Metadata(SimpleMetadata):
    """OPTIONS: the endpoint's name, description, renderers and parsers.

    No "actions": DRF would describe a POST by the view's serializer, and these
    POSTs act on existing objects rather than take a model's fields (the
    OpenAPI schema documents their bodies).
    """

    def determine_actions(self, request, view):
        return {}


MAX_PAGE_SIZE = 1000
PAGE_SIZE = 50


class PageQuery(serializers.Serializer):
    """A paged list's own parameters: a view's query check passes ``others=PAGE_PARAMETERS``."""

    page = serializers.IntegerField(required=False, min_value=1)
    page_size = serializers.IntegerField(required=False, min_value=1, max_value=MAX_PAGE_SIZE)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=MAX_PAGE_SIZE)

    def validate(self, data):
        if "page_size" in data and "limit" in data:
            raise serializers.ValidationError({"limit": "Give page_size or limit (the same thing), not both."})
        return data


PAGE_PARAMETERS = tuple(PageQuery._declared_fields)


class Pagination(PageNumberPagination):
    """Pages of PAGE_SIZE items; ``?page_size=`` (or its other name ``?limit=``) asks for 1 to MAX_PAGE_SIZE.

    A page or page size that is not a positive integer, or a page size over the
    maximum, is a 400 naming it rather than silently the default: a client that
    asked for 1000 rows must not believe it has them all. A page past the last is a 404.
    """

    page_size = PAGE_SIZE
    page_size_query_param = "page_size"
    max_page_size = MAX_PAGE_SIZE
    last_page_strings = ()

    def paginate_queryset(self, queryset, request, view=None):
        query = validated(PageQuery, request.query_params, others=None)  # the view checked the rest
        self.limit = query.get("limit")
        return super().paginate_queryset(queryset, request, view)

    def get_page_size(self, request):
        return self.limit if getattr(self, "limit", None) else super().get_page_size(request)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        bounds = {self.page_query_param: {"minimum": 1},
                  self.page_size_query_param: {"minimum": 1, "maximum": self.max_page_size}}
        for parameter in parameters:
            parameter["schema"].update(bounds.get(parameter["name"], {}))
        return [*parameters, {"name": "limit", "required": False, "in": "query",
                              "description": "Another name for page_size.",
                              "schema": {"type": "integer", "minimum": 1, "maximum": self.max_page_size}}]


# -- the error shape in the OpenAPI schema ----------------------------------------------------

class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="A stable word for programs: invalid, not_found, permission_denied, ...")
    message = serializers.CharField(help_text="What went wrong, for people.")
    # (a declared field is taken out of the class body, so this name does not hide Serializer.fields)
    fields = serializers.DictField(child=serializers.ListField(child=serializers.CharField()), required=False,
                                   help_text="400: each bad field (of the body or the query string) and what is wrong.")
    retry_after = serializers.IntegerField(required=False, help_text="429: seconds to wait.")


class ErrorSerializer(serializers.Serializer):
    """The shape of every error of the API (the schema's ``Error``)."""

    error = ErrorDetailSerializer()


ERROR_MEANINGS = {
    400: "Bad input: `fields` names each bad field.",
    401: "Not authenticated (no or bad token or session).",
    403: "Not a staff user, or a change without the model permission.",
    404: "No such object.",
    409: "The object's state does not allow this now.",
    429: "Rate limited: see Retry-After.",
    503: "A service the request needs (the shared cache) is unavailable; nothing was changed.",
}
# Every endpoint under /api/ but the health check answers these.
AUTH_ERRORS = (401, 403, 429)


def error_responses(*statuses: int) -> dict:
    """The schema's responses for these error statuses plus the authentication ones, all in the error shape."""
    return {status_code: OpenApiResponse(ErrorSerializer, description=ERROR_MEANINGS[status_code])
            for status_code in sorted({*statuses, *AUTH_ERRORS})}


# -- the views' own configuration ------------------------------------------------------------------

class APIDefaults:
    """Mixed into every view of the API (before DRF's view class): its authentication (an API token,
    looked up once per request with the rate limiter, or the admin's session), the permission rule,
    paging, OPTIONS, the OpenAPI schema and the error shape, whatever the host's REST_FRAMEWORK says."""

    authentication_classes = (TokenAuthentication, SessionAuthentication)
    permission_classes = (StaffReadsModelPermissionActs,)
    pagination_class = Pagination
    metadata_class = Metadata
    schema = AutoSchema()

    def get_exception_handler(self):
        return exception_handler


def api_operation(**kwargs):
    """drf-spectacular's ``extend_schema`` for a method of an API view, built on the API's own schema
    class. Left to itself, extend_schema builds on REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"], which a
    host need not point at drf-spectacular; the schema would then fail to generate."""
    decorate = extend_schema(**kwargs)

    def apply(method):
        method.schema = AutoSchema  # where extend_schema looks first for the class to extend
        return decorate(method)

    return apply
