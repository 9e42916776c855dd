"""What the dlq app wires up at start-up: the schedule, the subscriber, the handlers."""

from pathlib import Path

import pytest
from django.utils.module_loading import import_string

from integrations.dlq.models import DeadLetter
from integrations.dlq.tasks import redrive
from integrations.models import Integration
from integrations.resilience import execute
from integrations.schedules import registered_schedules


def test_the_redrive_schedule_is_registered_every_five_minutes():
    (spec,) = [spec for spec in registered_schedules() if spec.name == "dlq.redrive"]
    assert (spec.minutes, import_string(spec.func)) == (5, redrive)


@pytest.mark.django_db
def test_dead_letters_of_the_process_engine_reach_the_queue():
    from integrations.dlq import DeadLetter as DeadLetterRequest

    import dlq_test_handlers  # noqa: F401 - registers the dlq_test.* handlers

    Integration.objects.create(name="billing", max_retries=0, timeout_enforcement="inline")

    def down():
        raise ConnectionError("down")

    execute("billing", down, dead_letter=DeadLetterRequest("dlq_test.noop", {"order": 7}))
    assert DeadLetter.objects.get().payload == {"order": 7}


def test_the_dlq_package_imports_no_model():
    import subprocess
    import sys

    code = ("import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'resilience_site.settings'); "
            "from integrations.dlq import DeadLetter, dead_letter_handler; print('ok')")
    # before django.setup(): importing a model would raise AppRegistryNotReady
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert result.stdout.strip() == "ok", result.stderr
