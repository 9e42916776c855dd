"""The API's shared pieces: the error shape and "staff reads, model permission acts"."""

import pytest
from django.contrib.auth.models import Permission, User
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory, force_authenticate
from rest_framework.views import APIView

from integrations.api_common import APIDefaults, exception_handler
from integrations.models import Integration

pytestmark = pytest.mark.django_db


class IntegrationView(APIDefaults, APIView):
    """A view like the API's: its model comes from its queryset."""

    queryset = Integration.objects.all()

    def get(self, request):
        return Response({"ok": True})

    def post(self, request):
        return Response({"ok": True})


class ThrottledView(IntegrationView):
    def get(self, request):
        raise exceptions.Throttled(wait=12)


def call(method, user=None, view=IntegrationView):
    request = getattr(APIRequestFactory(), method)("/x/", {}, format="json")
    if user is not None:
        force_authenticate(request, user=user)
    return view.as_view()(request)


def test_the_permission_comes_from_the_views_queryset_model():
    staff = User.objects.create_user("staff", is_staff=True)
    assert call("get", staff).status_code == 200
    denied = call("post", staff)
    assert (denied.status_code, denied.data["error"]["message"]) == (
        403, "This needs the permission integrations.change_integration.")
    staff.user_permissions.add(Permission.objects.get(codename="change_integration"))
    staff = User.objects.get(pk=staff.pk)  # permissions are cached per instance
    assert call("post", staff).status_code == 200


def test_errors_keep_their_status_and_headers_in_the_contracts_shape():
    response = call("get", User.objects.create_user("staff", is_staff=True), view=ThrottledView)
    assert response.status_code == 429 and response["Retry-After"] == "12"
    assert response.data == {"error": {"code": "throttled", "retry_after": 12,
                                       "message": "Request was throttled. Expected available in 12 seconds."}}


def test_a_nested_validation_error_names_each_field():
    response = exception_handler(exceptions.ValidationError({"ids": {"0": ["Must be an integer."]}}), {})
    assert response.data["error"] == {"code": "invalid", "message": "ids: 0: Must be an integer.",
                                      "fields": {"ids": ["0: Must be an integer."]}}


def test_what_is_not_an_api_error_is_left_to_django():
    assert exception_handler(RuntimeError("bug"), {}) is None
