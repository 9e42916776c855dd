"""What the apps' management commands share: a database that was never migrated is a CommandError
that says to migrate, not a traceback from the first query."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor


def unapplied_migrations(alias: str = DEFAULT_DB_ALIAS) -> list[str]:
    """``app.migration`` for every migration the database has not applied."""
    executor = MigrationExecutor(connections[alias])
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    return [f"{migration.app_label}.{migration.name}" for migration, _backwards in plan]


class ResilienceCommand(BaseCommand):
    def execute(self, *args, **options):
        try:
            return super().execute(*args, **options)
        except DatabaseError as exc:
            try:
                pending = unapplied_migrations()
            except DatabaseError:
                raise exc from None  # the database itself is out of reach: its own error says so
            if not pending:
                raise  # the tables are there: a real database error, with its traceback
            shown = ", ".join(pending[:3]) + (f" and {len(pending) - 3} more" if len(pending) > 3 else "")
            raise CommandError(f"The database is not migrated ({len(pending)} migrations not applied: {shown}): "
                               f"run `python manage.py migrate` first. The query failed with: {exc}") from exc
