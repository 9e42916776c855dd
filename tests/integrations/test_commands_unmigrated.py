"""The apps' commands on a database that was never migrated: a CommandError that says to migrate,
not a traceback from the first query (each run as a user runs it: manage.py in a process of its own)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

COMMANDS = [("resilience", "status"), ("integrations", "export", "-", "--format", "json"), ("dlq", "stats"), ("watchdog",),
            ("healthcheck",), ("seed_integrations",)]


def manage(database: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "DJANGO_SETTINGS_MODULE")}
    env["DATABASE_URL"] = f"sqlite:///{database}"
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: " ".join(args))
def test_a_command_on_an_unmigrated_database_says_to_migrate(tmp_path, args):
    run = manage(tmp_path / "fresh.sqlite3", *args)
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("CommandError: The database is not migrated (")
    assert "run `python manage.py migrate` first. The query failed with: no such table:" in run.stderr


def test_once_migrated_the_same_command_runs(tmp_path):
    database = tmp_path / "migrated.sqlite3"
    assert manage(database, "migrate", "--no-input", "-v0").returncode == 0
    run = manage(database, "resilience", "status")
    assert run.returncode == 0, run.stderr
    assert "No integrations" in run.stdout and "integrations import" in run.stdout
