"""``manage.py resilience <subcommand>``: the product's operations in one command."""

from django.core.management.base import BaseCommand

from integrations.schedules import install_schedules


class Command(BaseCommand):
    help = "Operate the resilience layer."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="{schedules}")
        sub.add_parser("schedules", help="Install every django-q schedule of the product (idempotent).")

    def handle(self, *args, subcommand, **options):
        return getattr(self, f"handle_{subcommand}")(**options)

    def handle_schedules(self, **options):
        installed = install_schedules()
        if not installed:
            self.stdout.write("No schedules are registered.")
        for spec, created in installed:
            verb = "installed" if created else "updated"
            self.stdout.write(f"{verb} {spec.name}: {spec.func} every {spec.minutes} min")
