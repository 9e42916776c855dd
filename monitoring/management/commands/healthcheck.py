"""``manage.py healthcheck [NAME ...]``: run health checks now.

Steps:
1. pick the health checks of the named integrations (every enabled check without names);
   an unknown name, or an integration without a check, is an error before anything runs;
2. run each one: probe, keep the result, update the health, raise or resolve its alert;
3. print one line per check: integration, health, latency, error;
4. exit with status 1 when any checked upstream is down.
"""

from django.core.management.base import CommandError

from integrations.management.base import ResilienceCommand
from monitoring.models import HealthCheck


class Command(ResilienceCommand):
    help = "Run health checks now (all enabled ones, or those of the named integrations)."

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*", metavar="NAME", help="Integration names (default: every check).")

    def handle(self, *args, names, **options):
        checks = HealthCheck.objects.select_related("integration")
        if names:
            checks = list(checks.filter(integration__name__in=names))
            missing = sorted(set(names) - {check.integration.name for check in checks})
            if missing:
                raise CommandError(f"No health check for: {', '.join(missing)}.")
        else:
            checks = list(checks.filter(enabled=True))
            if not checks:
                self.stdout.write("No health checks are configured.")
                return
        down = []
        for check in checks:
            result = check.run()
            line = f"{check.integration.name:<30} {check.status:<8} {result.latency_ms:8.1f} ms"
            if result.error:
                line += f"  {result.error}"
            self.stdout.write((self.style.ERROR if check.status == HealthCheck.DOWN else self.style.SUCCESS)(line))
            if check.status == HealthCheck.DOWN:
                down.append(check.integration.name)
        if down:
            raise CommandError(f"Down: {', '.join(down)}.", returncode=1)
