"""Puts the load database in a known state; run.py runs it after migrate, with the load settings.

    DJANGO_SETTINGS_MODULE=benchmarks.load.settings python benchmarks/load/prepare.py

1. The integration the guarded endpoint calls (settings.LOAD_INTEGRATION): the
   external_api preset, reset to it on every run (so an edit in the admin does
   not carry over into the figures), response cache off so that every request
   reaches the upstream, breaker closed.
2. A staff user ``load`` and its API token, for the API read endpoint.
3. Prints {"token": ...} as JSON on the last line.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.load.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from integrations.models import Integration  # noqa: E402
from integrations.resilience import get_engine  # noqa: E402

KIND = "external_api"


def prepare_integration() -> Integration:
    integration = Integration.objects.filter(name=settings.LOAD_INTEGRATION).first()
    if integration is None:
        integration = Integration(name=settings.LOAD_INTEGRATION, kind=KIND)
    integration.apply_preset(KIND)
    integration.description = "The load benchmark's local upstream (benchmarks/load)."
    integration.cache_ttl_s = 0
    integration.full_clean()
    integration.save()
    get_engine().reset_breaker(integration.to_policy(), by="benchmarks/load", reason="load benchmark start")
    return integration


def prepare_token() -> str:
    user, _ = get_user_model().objects.get_or_create(username="load", defaults={"is_staff": True})
    if not user.is_staff or not user.is_active:
        user.is_staff = user.is_active = True
        user.save()
    token, _ = Token.objects.get_or_create(user=user)
    return token.key


if __name__ == "__main__":
    prepare_integration()
    print(json.dumps({"token": prepare_token()}))
