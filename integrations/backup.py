"""Back up and restore the product's tables: one JSON file, restored all or nothing.

    register_backup_section("dead_letters", ["dlq.DeadLetter"], description=...)
    write_backup(stream, include=("statistics",))
    restore_backup(stream)          # -> RestoreReport; raises InvalidBackup naming what is wrong

Each app declares the tables that matter as sections (its AppConfig.ready, as
it declares its schedules), so this module knows monitoring's tables without
importing monitoring. A section is in every backup unless it is ``optional``
(high-volume or history tables: only when asked with ``include``). Tables no
section names are left out on purpose: docs/backup.md says why each can be
dropped.

The file: ``{"format": "django-resilience-backup", "version": 1, "created_at",
"sections": {name: [objects as Django's JSON serializer writes them]}}``.
Rows with a natural key (an integration's name, a channel's name, a health
check's integration, a statistics row's integration and minute) are written
by it, and referred to by it, so a restore into another database finds the
row to update; other rows (dead letters) keep their primary key.

Restore, in order:

1. read and check the whole file: the format and version, known sections, each
   object of a model its section holds, each object deserializable;
2. in one transaction, section by section in declaration order (an integration
   before what refers to it): each row validated (``full_clean``: a bad value
   is named with its section, its position in the file and the field), then
   saved over the row with the same natural key or primary key, or created. A
   dead letter whose primary key belongs to another entry (another handler or
   creation time) is refused rather than overwritten;
3. the primary key sequences reset (rows came with their keys), and every
   restored integration's ``cache_version`` moved past both the file's and the
   database's (no response cached before the restore is served after it) and
   its ``updated_at`` set to now, so every process reloads its policy.

Any error in 1 or 2 raises InvalidBackup and the transaction restores nothing.
Restoring the same file twice leaves the same rows (save for step 3's
``updated_at`` and ``cache_version``). Rows absent from the file are kept: a
dead letter enqueued since the backup is work not to lose.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import IO, Iterable

from django.apps import apps
from django.core import serializers
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.core.management.color import no_style
from django.core.serializers.base import DeserializationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections, router, transaction
from django.db.models import F, JSONField, Value
from django.db.models.functions import Greatest, Now

FORMAT = "django-resilience-backup"
VERSION = 1


class InvalidBackup(Exception):
    """The file cannot be restored; the message names what is wrong. Nothing was restored."""


@dataclass(frozen=True)
class BackupSection:
    name: str
    models: tuple[str, ...]  # "app_label.ModelName", in the order they are restored
    optional: bool = False
    description: str = ""

    def model_classes(self) -> list:
        return [apps.get_model(label) for label in self.models]

    def labels(self) -> set[str]:
        return {label.lower() for label in self.models}


_SECTIONS: dict[str, BackupSection] = {}


def register_backup_section(name: str, models: Iterable[str], *, optional: bool = False,
                            description: str = "") -> BackupSection:
    """Declare tables of the product's backup; sections are restored in the order they were declared."""
    section = BackupSection(name, tuple(models), optional, description)
    _SECTIONS[name] = section
    return section


def registered_sections() -> list[BackupSection]:
    return list(_SECTIONS.values())


def _sections_for(include: Iterable[str]) -> list[BackupSection]:
    include = set(include)
    unknown = include - set(_SECTIONS)
    if unknown:
        raise InvalidBackup(f"Unknown section(s) {', '.join(sorted(unknown))}; the sections are "
                            f"{', '.join(_SECTIONS)}.")
    return [section for section in _SECTIONS.values() if not section.optional or section.name in include]


# -- backup ------------------------------------------------------------------------------------

class BackupEncoder(DjangoJSONEncoder):
    """DjangoJSONEncoder, but times keep their microseconds: a dead letter's created_at is part of
    what identifies it on restore, and its schedule must come back as it was."""

    def default(self, o):
        if isinstance(o, (dt.datetime, dt.time)):
            return o.isoformat()
        return super().default(o)


def backup_document(include: Iterable[str] = ()) -> dict:
    """The backup (BackupEncoder writes it): every default section, plus the optional ones in ``include``."""
    sections = {}
    for section in _sections_for(include):
        objects = []
        for model in section.model_classes():
            rows = model._default_manager.order_by("pk")
            objects += serializers.serialize("python", rows, use_natural_foreign_keys=True,
                                             use_natural_primary_keys=True)
        sections[section.name] = objects
    return {"format": FORMAT, "version": VERSION,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "sections": sections}


def write_backup(stream: IO[str], include: Iterable[str] = ()) -> dict[str, int]:
    """Write the backup to ``stream``; returns the number of rows per section."""
    document = backup_document(include)
    json.dump(document, stream, indent=1, sort_keys=True, cls=BackupEncoder)
    stream.write("\n")
    return {name: len(objects) for name, objects in document["sections"].items()}


# -- restore -----------------------------------------------------------------------------------

@dataclass
class RestoreReport:
    created: dict[str, int] = field(default_factory=dict)
    updated: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [f"{name}: {self.created.get(name, 0)} created, {self.updated.get(name, 0)} updated"
                for name in self.created]


def read_document(stream: IO[str]) -> dict:
    """Step 1: the file parsed and its shape checked, before anything is written."""
    try:
        document = json.load(stream)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidBackup(f"The file is not JSON: {error}.") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InvalidBackup(f'Not a backup of this product: "format" must be "{FORMAT}" '
                            "(a file written by `manage.py resilience backup`).")
    if document.get("version") != VERSION:
        raise InvalidBackup(f"Backup version {document.get('version')!r} is not supported; this version "
                            f"reads version {VERSION}.")
    sections = document.get("sections")
    if not isinstance(sections, dict):
        raise InvalidBackup('"sections" must be an object of section name to a list of rows.')
    unknown = set(sections) - set(_SECTIONS)
    if unknown:
        raise InvalidBackup(f"Unknown section(s) {', '.join(sorted(unknown))}; the sections are "
                            f"{', '.join(_SECTIONS)}.")
    for name, objects in sections.items():
        if not isinstance(objects, list):
            raise InvalidBackup(f'Section "{name}" must be a list of rows.')
        for position, obj in enumerate(objects, 1):
            where = f'Section "{name}", row {position}'
            if not isinstance(obj, dict) or not isinstance(obj.get("fields"), dict):
                raise InvalidBackup(f'{where}: a row must be an object with "model" and "fields".')
            if str(obj.get("model", "")).lower() not in _SECTIONS[name].labels():
                raise InvalidBackup(f'{where}: model {obj.get("model")!r} does not belong in this section '
                                    f"(it holds {', '.join(_SECTIONS[name].models)}).")
    return document


def restore_backup(stream: IO[str], *, using: str | None = None) -> RestoreReport:
    """Restore a backup all or nothing (steps in the module docstring); raises InvalidBackup."""
    document = read_document(stream)
    report = RestoreReport()
    restored_models = []
    integrations: dict[str, int] = {}  # name -> the highest cache_version seen (file or database)
    Integration = apps.get_model("integrations", "Integration")
    using = using or router.db_for_write(Integration)
    with transaction.atomic(using=using):
        for section in registered_sections():
            objects = document["sections"].get(section.name)
            if objects is None:
                continue
            report.created[section.name] = report.updated[section.name] = 0
            for position, obj in enumerate(objects, 1):
                where = f'Section "{section.name}", row {position} ({obj["model"]})'
                restored = _deserialize(obj, where, using)
                instance = restored.object
                model = type(instance)
                if model not in restored_models:
                    restored_models.append(model)
                existing = model._default_manager.using(using).filter(pk=instance.pk).first() \
                    if instance.pk is not None else None
                _check_same_row(model, instance, existing, where)
                instance._state.adding = existing is None  # unique checks then leave the row itself out
                if model is Integration:
                    integrations[instance.name] = max(instance.cache_version,
                                                      existing.cache_version if existing else 0)
                # A JSON value came through the deserializer already; {} and [] are values, not blanks.
                json_values = [f.name for f in model._meta.fields
                               if isinstance(f, JSONField) and getattr(instance, f.attname) is not None]
                try:
                    instance.full_clean(exclude=json_values, validate_unique=True)
                except ValidationError as error:
                    raise InvalidBackup(f"{where}: {_errors(error)}") from None
                restored.save(using=using)
                (report.updated if existing else report.created)[section.name] += 1
        _reset_sequences(using, restored_models)
        for name, version in integrations.items():
            Integration._default_manager.using(using).filter(name=name).update(
                cache_version=Greatest(F("cache_version"), Value(version)) + 1, updated_at=Now())
    if integrations:
        from .models import policy_changed

        for integration in Integration._default_manager.using(using).filter(name__in=integrations):
            policy_changed.send(sender=Integration, instance=integration)
    return report


def _deserialize(obj: dict, where: str, using: str):
    try:
        (restored,) = serializers.deserialize("python", [obj], using=using, handle_forward_references=False)
    except DeserializationError as error:
        raise InvalidBackup(f"{where}: {_deserialization_problem(error)}") from None
    return restored


def _deserialization_problem(error: DeserializationError) -> str:
    """Django says "<cause>: (<model>:pk=<pk>) field_value was '<value>'"; the cause and the value are what matter."""
    cause = error.__cause__ or error.__context__
    value = re.search(r"field_value was '(.*)'$", str(error), re.DOTALL)
    shown = f" (the value {value.group(1)})" if value else ""
    if isinstance(cause, ObjectDoesNotExist):
        return f"it refers to a row that is neither earlier in the file nor in this database{shown}."
    if isinstance(cause, ValidationError):
        return " ".join(cause.messages) + shown
    return str(cause or error)


# Fields that say which row a primary key is: a row of the file with the key of a different
# row in the database is refused, not written over it.
IDENTITY_FIELDS = {"dlq.deadletter": ("handler_name", "created_at"), "integrations.breakerevent": ("to_state", "at")}


def _check_same_row(model, instance, existing, where: str) -> None:
    fields = IDENTITY_FIELDS.get(model._meta.label_lower, ())
    if existing is None or not fields:
        return
    differs = [name for name in fields if getattr(existing, name) != getattr(instance, name)]
    if differs:
        raise InvalidBackup(f"{where}: primary key {instance.pk} is another row in this database "
                            f"({', '.join(f'{name} {getattr(existing, name)!r}' for name in differs)} there, "
                            f"{', '.join(repr(getattr(instance, name)) for name in differs)} in the file); "
                            "restore into the database it was taken from, or an empty one.")


def _errors(error: ValidationError) -> str:
    if hasattr(error, "error_dict"):
        return "; ".join(f"{name}: {' '.join(messages)}" for name, messages in error.message_dict.items())
    return " ".join(error.messages)


def _reset_sequences(using: str, models: list) -> None:
    connection = connections[using]
    statements = connection.ops.sequence_reset_sql(no_style(), models)
    if statements:
        with connection.cursor() as cursor:
            for sql in statements:
                cursor.execute(sql)
