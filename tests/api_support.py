"""Helpers of the HTTP API tests: clients of each kind of user, and the error shape."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from rest_framework.test import APIClient


def client_for(username: str, *, staff: bool = True, perms: tuple[str, ...] = ()) -> APIClient:
    """A client logged in (session) as a new user with these permission codenames."""
    user = User.objects.create_user(username, is_staff=staff)
    user.user_permissions.add(*(Permission.objects.get(codename=codename) for codename in perms))
    client = APIClient()
    client.force_login(user)
    return client


def clients(perm: str) -> dict[str, APIClient]:
    """One client per row of the permission matrix for the change permission ``perm``: anonymous,
    non-staff, staff with the model's view permission only, staff with ``perm``."""
    return {"anonymous": APIClient(), "member": client_for("member", staff=False),
            "viewer": client_for("viewer", perms=(perm.replace("change_", "view_"),)),
            "operator": client_for("operator", perms=(perm,))}


def error_of(response, status: int) -> dict:
    """The body's error, after checking the status and the contract's shape."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


@pytest.fixture(autouse=True)
def no_rate_limits(settings):
    """API tests make many requests from one client: the inbound limits are off (imported, it is autouse)."""
    settings.RESILIENCE_RATE_LIMITS = {}
