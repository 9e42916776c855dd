"""Create one sample integration of each kind, for a first look at the console."""

from integrations.management.base import ResilienceCommand
from integrations.models import Integration

SAMPLES = (
    ("billing", "external_api", "Payment provider API", {}),
    ("orders-db", "database", "The orders database", {}),
    ("assistant", "ai_service", "LLM completions", {"hourly_limit": 500, "daily_limit": 5000}),
    ("market-data", "market_data", "Quotes feed", {"hourly_limit": 1000, "cache_ttl_s": 30}),
    ("session-cache", "cache", "Session cache", {}),
)


class Command(ResilienceCommand):
    help = "Create sample integrations (one per kind) unless they exist; existing rows are left as they are."

    def handle(self, *args, **options):
        for name, kind, description, knobs in SAMPLES:
            _, created = Integration.objects.get_or_create(
                name=name, defaults={"kind": kind, "description": description, **knobs})
            self.stdout.write(f"{'created' if created else 'kept'} {name} ({kind})")
