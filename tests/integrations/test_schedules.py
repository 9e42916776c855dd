import pytest
from django.core.management import call_command
from django_q.models import Schedule

from integrations import schedules


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(schedules, "_SCHEDULES", {})
    return schedules


@pytest.mark.django_db
def test_resilience_schedules_installs_each_schedule_once_however_often_it_runs(registry, capsys):
    registry.register_schedule("demo.tick", "math.floor", minutes=5)
    call_command("resilience", "schedules")
    registry.register_schedule("demo.tick", "math.ceil", minutes=2)
    call_command("resilience", "schedules")
    schedule = Schedule.objects.get(name="demo.tick")
    assert (schedule.func, schedule.minutes, Schedule.objects.count()) == ("math.ceil", 2, 1)
    out = capsys.readouterr().out
    assert "installed demo.tick" in out and "updated demo.tick" in out


def test_a_schedule_must_run_at_least_every_minute(registry):
    with pytest.raises(ValueError, match="minutes"):
        registry.register_schedule("bad", "math.floor", minutes=0)
