"""The product's django-q schedules, declared by each part and installed by one command.

    register_schedule("dlq.redrive", "integrations.dlq.tasks.redrive", minutes=5)

``manage.py resilience schedules`` installs every registered schedule,
idempotently: an existing one is updated in place, never duplicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    func: str  # dotted path of the task function
    every: int | Callable[[], int]  # minutes, or a function of the settings read when installed
    description: str = ""

    @property
    def minutes(self) -> int:
        minutes = self.every() if callable(self.every) else self.every
        if minutes < 1:
            raise ValueError(f"schedule {self.name!r}: minutes must be at least 1, got {minutes}")
        return minutes


_SCHEDULES: dict[str, ScheduleSpec] = {}


def register_schedule(name: str, func: str, minutes: int | Callable[[], int], description: str = "") -> ScheduleSpec:
    spec = ScheduleSpec(name, func, minutes, description)
    if not callable(minutes):
        spec.minutes  # noqa: B018 -- checked now; a setting is checked by manage.py check and when read
    _SCHEDULES[name] = spec
    return spec


def registered_schedules() -> list[ScheduleSpec]:
    return sorted(_SCHEDULES.values(), key=lambda spec: spec.name)


def install_schedules() -> list[tuple[ScheduleSpec, bool]]:
    """Create or update each schedule; returns (spec, created) pairs."""
    from django_q.models import Schedule

    installed = []
    for spec in registered_schedules():
        _, created = Schedule.objects.update_or_create(
            name=spec.name,
            defaults={"func": spec.func, "schedule_type": Schedule.MINUTES, "minutes": spec.minutes,
                      "repeats": -1},
        )
        installed.append((spec, created))
    return installed
