"""ASGI entry point: ``uvicorn resilience_site.asgi:application``."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "resilience_site.settings")

application = get_asgi_application()
