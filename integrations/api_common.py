"""What every view of the HTTP API shares (CONTRACT.md): the error shape and the permission rule.

Errors are ``{"error": {"code", "message", ...}}``; a bad input also names
its fields: ``{"error": {"code": "invalid", "message": "limit: ...",
"fields": {"limit": ["..."]}}}``. Reads need a staff user; changes need a
staff user with the model permission.
"""

from __future__ import annotations

from rest_framework import exceptions, serializers
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.views import exception_handler as drf_exception_handler

# What a change needs, by method: this API's POSTs act on existing objects
# (retry, acknowledge, reset), so they need the change permission, not add.
ACTION_BY_METHOD = {"POST": "change", "PUT": "change", "PATCH": "change", "DELETE": "delete"}


def exception_handler(exc, context):
    """DRF's handler (status, headers such as WWW-Authenticate and Retry-After), in the contract's shape."""
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
    POST, PUT and PATCH need ``<app>.change_<model>``, DELETE ``<app>.delete_<model>``.
    Anonymous requests get 401 (the authenticators' challenge), others 403.
    """

    message = "This needs a staff user."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_staff):
            return False
        if request.method in SAFE_METHODS:
            return True
        action = ACTION_BY_METHOD.get(request.method)
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
