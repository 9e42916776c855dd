"""GET /metrics: the Prometheus exposition, behind RESILIENCE_METRICS_TOKEN when it is set.

The token travels only as ``Authorization: Bearer <token>``, which
Prometheus sends from its scrape config (``authorization`` or
``bearer_token_file``). A ``?token=`` query parameter is not accepted: URLs
end up in access logs, proxies and browser history. Without the header: 401;
with a wrong token: 403. The comparison takes the same time whatever the
token. An empty RESILIENCE_METRICS_TOKEN leaves /metrics open.
"""

from __future__ import annotations

import hmac

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST

from .metrics_scrape import render
from .conf import monitoring_settings


def bearer_token(request: HttpRequest) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _refusal(status: int, code: str, message: str) -> JsonResponse:
    response = JsonResponse({"error": {"code": code, "message": message}}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    expected = monitoring_settings.METRICS_TOKEN
    if expected:
        presented = bearer_token(request)
        if presented is None:
            return _refusal(401, "metrics_token_required",
                            "Send the metrics token as 'Authorization: Bearer <token>'.")
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            return _refusal(403, "metrics_token_invalid", "The metrics token is not valid.")
    return HttpResponse(render(), content_type=CONTENT_TYPE_LATEST)
