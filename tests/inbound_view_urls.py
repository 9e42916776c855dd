"""URLs for tests/integrations/test_inbound_views.py: views limited with ``@rate_limit`` and client key functions.

The key functions are importable by dotted path (``inbound_view_urls.organisation``), as a project's
RESILIENCE_RATE_LIMIT_CLIENT_KEY names its own.
"""

from django.http import JsonResponse
from django.urls import path
from django.utils.decorators import method_decorator
from django.views.decorators.csrf import csrf_exempt
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from integrations.api_common import APIDefaults
from integrations.inbound import api_token, rate_limit


def organisation(request):
    """The organisation of the API token's user (its first group): every member spends one budget."""
    token = api_token(request)
    if token is None or not token.user.is_active:
        return None
    group = token.user.groups.order_by("name").first()
    return f"org:{group.name}" if group is not None else None


def tenant_header(request):
    """The tenant a view trusts its (authenticated, in a real project) caller to name."""
    tenant = request.headers.get("X-Tenant")
    return f"tenant:{tenant}" if tenant else None


def a_number(request):
    return 42


def broken(request):
    raise LookupError("no such organisation table")


def two_arguments(request, organisation_id):
    return None


not_callable = "org:acme"


@rate_limit("2/m")
def export(request):
    return JsonResponse({"exported": True})


@rate_limit("2/m", key=tenant_header)
def tenant_report(request):
    return JsonResponse({"report": True})


@rate_limit("3/m", name="reports")
def daily_report(request):
    return JsonResponse({"report": "daily"})


@rate_limit("3/m", name="reports")
def weekly_report(request):
    return JsonResponse({"report": "weekly"})


@csrf_exempt
@rate_limit("1/m", methods=["POST"])
def comment(request):
    return JsonResponse({"posted": request.method == "POST"})


@rate_limit("2/m")
async def async_export(request):
    return JsonResponse({"exported": "async"})


@rate_limit("1/m")
def api_export(request):
    return JsonResponse({"exported": "api"})


@method_decorator(rate_limit("2/m", name="whoami"), name="dispatch")
class WhoAmI(APIDefaults, APIView):
    permission_classes = [AllowAny]

    def get(self, request):
        return Response({"username": request.user.username or None})


urlpatterns = [
    path("export/", export),
    path("tenant-report/", tenant_report),
    path("reports/daily/", daily_report),
    path("reports/weekly/", weekly_report),
    path("comment/", comment),
    path("async-export/", async_export),
    path("api/export/", api_export),
    path("api/whoami/", WhoAmI.as_view()),
]
