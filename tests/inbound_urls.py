"""URLs for tests/integrations/test_inbound.py: API endpoints of its own, so the tests do not depend on the real API, and the
real admin."""

from django.contrib import admin
from django.http import HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST, require_safe
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from integrations.api_common import APIDefaults


@require_safe
def ping(request):
    return JsonResponse({"pong": True})


@csrf_exempt
@require_POST
def create_thing(request):
    return JsonResponse({"created": True}, status=201)


@require_safe
def health(request):
    return JsonResponse({"status": "ok"})


@require_safe
def metrics(request):
    return HttpResponse("up 1\n", content_type="text/plain; version=0.0.4")


class WhoAmI(APIDefaults, APIView):
    """A DRF view configured as the API's views are (authentication, error shape)."""

    permission_classes = [IsAuthenticated]

    def get(self, request):
        return Response({"username": request.user.username})


urlpatterns = [
    path("api/whoami/", WhoAmI.as_view()),
    path("admin/", admin.site.urls),
    path("api/ping/", ping),
    path("api/things/", create_thing),
    path("api/health/", health),
    path("metrics", metrics),
]
