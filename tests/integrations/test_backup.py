"""``manage.py resilience backup`` and ``restore`` (integrations/backup.py): round trips and bad files."""

import datetime as dt
import json
from io import StringIO

import pytest
from django.core import serializers
from django.core.management import CommandError, call_command
from django.utils import timezone

from integrations.backup import FORMAT, BackupEncoder, InvalidBackup, backup_document, registered_sections, restore_backup
from integrations.dlq.models import DeadLetter
from integrations.models import BreakerEvent, Integration
from monitoring.models import CallStats, HealthCheck, NotificationChannel

pytestmark = pytest.mark.django_db

# Fields a restore sets itself (integrations/backup.py, step 3), left out of the comparisons.
SET_BY_RESTORE = {"integrations.integration": ("updated_at", "cache_version")}
DEFAULT_MODELS = (Integration, DeadLetter, HealthCheck, NotificationChannel)


def run(*args):
    out, err = StringIO(), StringIO()
    call_command("resilience", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def snapshot(*models):
    """Every row of ``models`` as the serializer writes it, keyed by natural key or pk."""
    rows = {}
    for model in models:
        for row in json.loads(serializers.serialize("json", model.objects.order_by("pk"),
                                                    use_natural_foreign_keys=True, use_natural_primary_keys=True)):
            for name in SET_BY_RESTORE.get(row["model"], ()):
                row["fields"].pop(name)
            key = row.get("pk") or json.dumps(row["fields"].get("name") or row["fields"].get("integration"))
            rows[(row["model"], key)] = row["fields"]
    return rows


@pytest.fixture
def product():
    billing = Integration.objects.create(name="billing", kind="external_api", hourly_limit=1000,
                                         failure_threshold=7, mode="forced_open", description="Billing API")
    Integration.objects.create(name="geo", kind="market_data", capacity=0.5)
    HealthCheck.objects.create(integration=billing, url="https://billing.example/health", interval_s=120)
    NotificationChannel.objects.create(name="ops", kind=NotificationChannel.WEBHOOK,
                                       url="https://hooks.example/alerts", rate_limit=5)
    DeadLetter.enqueue("billing", "billing.charge", {"order": 42, "lines": [1, 2]}, idempotency_key="order-42")
    DeadLetter.enqueue("billing", "billing.refund", {})
    BreakerEvent.objects.create(integration=billing, from_state="closed", to_state="open", reason="5 failures",
                                at=timezone.now())
    CallStats.objects.create(integration=billing, minute=timezone.now().replace(second=0, microsecond=0),
                             calls=10, successes=9)
    return billing


def wipe():
    for model in (DeadLetter, Integration):  # every other product row cascades from its integration
        model.objects.all().delete()


def write(tmp_path, document, name="backup.json"):
    path = tmp_path / name
    path.write_text(json.dumps(document, cls=BackupEncoder))
    return path


def test_a_backup_wiped_and_restored_gives_the_same_rows(product, tmp_path):
    before = snapshot(*DEFAULT_MODELS)
    path = tmp_path / "backup.json"
    _, err = run("backup", "--output", str(path))
    assert "integrations: 3" in err and "dead_letters: 2" in err and "monitoring: 2" in err  # notify.ops too
    wipe()
    assert not Integration.objects.exists() and not HealthCheck.objects.exists()

    out, _ = run("restore", str(path))

    assert snapshot(*DEFAULT_MODELS) == before
    assert "integrations: 3 created, 0 updated" in out and "dead_letters: 2 created, 0 updated" in out
    restored = Integration.objects.get(name="billing")
    assert (restored.mode, restored.failure_threshold, restored.hourly_limit) == ("forced_open", 7, 1000)
    assert restored.health_check.url == "https://billing.example/health"
    assert NotificationChannel.objects.get(name="ops").integration.name == "notify.ops"


def test_a_row_created_after_a_restore_gets_a_new_primary_key(product, tmp_path):
    path = tmp_path / "backup.json"
    run("backup", "--output", str(path))
    highest = DeadLetter.objects.order_by("-pk").first().pk
    wipe()
    run("restore", str(path))

    entry, created = DeadLetter.enqueue("billing", "billing.charge", {"order": 43})

    assert created and entry.pk > highest  # the sequences were moved past the restored keys


def test_restoring_twice_is_idempotent(product, tmp_path):
    path = tmp_path / "backup.json"
    run("backup", "--output", str(path))
    wipe()
    run("restore", str(path))
    once = snapshot(*DEFAULT_MODELS)
    counts = {model: model.objects.count() for model in DEFAULT_MODELS}

    out, _ = run("restore", str(path))

    assert snapshot(*DEFAULT_MODELS) == once
    assert {model: model.objects.count() for model in DEFAULT_MODELS} == counts
    assert "integrations: 0 created, 3 updated" in out and "dead_letters: 0 created, 2 updated" in out


def test_a_restore_over_edited_rows_puts_the_backed_up_values_back_and_keeps_newer_dead_letters(product):
    document = backup_document()
    Integration.objects.filter(name="billing").update(failure_threshold=2, mode="normal")
    newer, _ = DeadLetter.enqueue("geo", "geo.lookup", {"q": "Paris"})

    restore_backup(StringIO(json.dumps(document, cls=BackupEncoder)))

    billing = Integration.objects.get(name="billing")
    assert (billing.failure_threshold, billing.mode) == (7, "forced_open")
    assert DeadLetter.objects.filter(pk=newer.pk).exists()


def test_a_restore_moves_the_cache_version_past_the_file_and_the_database(product):
    document = backup_document()  # billing at cache_version 0
    for _ in range(3):
        product.clear_cache()
    assert Integration.objects.get(name="billing").cache_version == 3

    restore_backup(StringIO(json.dumps(document, cls=BackupEncoder)))

    assert Integration.objects.get(name="billing").cache_version == 4  # no response cached before is served


def test_the_optional_sections_are_left_out_unless_included(product, tmp_path):
    assert {section.name for section in registered_sections() if section.optional} == {"breaker_history",
                                                                                       "statistics"}
    assert set(backup_document()["sections"]) == {"integrations", "dead_letters", "monitoring"}
    path = tmp_path / "full.json"
    run("backup", "--output", str(path), "--include", "statistics", "breaker_history")
    document = json.loads(path.read_text())
    assert len(document["sections"]["statistics"]) == 1 and len(document["sections"]["breaker_history"]) == 1
    history_before = snapshot(CallStats, BreakerEvent)
    wipe()
    assert not CallStats.objects.exists() and not BreakerEvent.objects.exists()

    run("restore", str(path))

    assert len(history_before) == 2 and snapshot(CallStats, BreakerEvent) == history_before


def test_backup_to_stdout_is_the_document(product):
    out, _ = run("backup")
    document = json.loads(out)
    assert document["format"] == FORMAT and document["version"] == 1
    names = [row["fields"]["name"] for row in document["sections"]["integrations"]]
    assert names == ["billing", "geo", "notify.ops"]


def test_an_unknown_section_to_include_is_refused_naming_the_known_ones(product):
    with pytest.raises(CommandError, match="Unknown section.*alerts.*integrations, breaker_history"):
        run("backup", "--include", "alerts")


# -- bad files: a clear error, and nothing restored ----------------------------------------------

def assert_nothing_restored():
    assert not Integration.objects.exists() and not DeadLetter.objects.exists()


@pytest.fixture
def document(product):
    document = backup_document()
    wipe()
    return document


def test_a_file_that_is_not_json_is_refused(tmp_path, db):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "django-resilience-backup", ')
    with pytest.raises(CommandError, match=r"broken.json: The file is not JSON: .* Nothing was restored\."):
        run("restore", str(path))


def test_a_missing_file_is_refused_naming_it(tmp_path, db):
    with pytest.raises(CommandError, match=r"Cannot read .*nowhere.json: No such file"):
        run("restore", str(tmp_path / "nowhere.json"))


def test_a_file_of_another_kind_is_refused(tmp_path, db):
    path = write(tmp_path, [{"model": "integrations.integration", "fields": {"name": "x"}}])  # a dumpdata fixture
    with pytest.raises(CommandError, match='Not a backup of this product: "format" must be'):
        run("restore", str(path))


def test_another_version_is_refused(document, tmp_path):
    document["version"] = 2
    with pytest.raises(CommandError, match="Backup version 2 is not supported"):
        run("restore", str(write(tmp_path, document)))
    assert_nothing_restored()


def test_an_unknown_section_is_refused(document, tmp_path):
    document["sections"]["alerts"] = []
    with pytest.raises(CommandError, match="Unknown section.*alerts"):
        run("restore", str(write(tmp_path, document)))
    assert_nothing_restored()


def test_a_row_of_a_model_foreign_to_its_section_is_refused(document, tmp_path):
    document["sections"]["dead_letters"].append({"model": "auth.user", "fields": {"username": "eve"}})
    with pytest.raises(CommandError, match=r'Section "dead_letters", row 3: model .auth.user. does not belong'):
        run("restore", str(write(tmp_path, document)))
    assert_nothing_restored()


@pytest.mark.parametrize("section, row, field, value, message", [
    # late in the file: the integrations and the first entry, restored before it, are rolled back
    ("dead_letters", 2, "status", "lost", r"\(dlq.deadletter\): status: Value 'lost' is not a valid choice"),
    ("integrations", 2, "failure_threshold", 0, r"\(integrations.integration\): failure_threshold: Must be at "
                                                 r"least 1"),
    ("integrations", 1, "window_size", "twenty", r"\(integrations.integration\): .twenty. value must be an "
                                                  r"integer. \(the value twenty\)"),
])
def test_a_bad_value_names_its_section_row_and_field_and_restores_nothing(document, tmp_path, section, row, field,
                                                                          value, message):
    document["sections"][section][row - 1]["fields"][field] = value
    with pytest.raises(CommandError, match=f'Section "{section}", row {row} {message}'):
        run("restore", str(write(tmp_path, document)))
    assert_nothing_restored()


def test_a_health_check_of_an_integration_missing_from_the_file_is_refused(document, tmp_path):
    document["sections"]["integrations"] = [row for row in document["sections"]["integrations"]
                                            if row["fields"]["name"] != "billing"]
    with pytest.raises(CommandError, match=r'Section "monitoring", row 1 \(monitoring.healthcheck\): it refers to a '
                                           r"row that is neither earlier in the file nor in this database "
                                           r"\(the value \['billing'\]\)"):
        run("restore", str(write(tmp_path, document)))
    assert_nothing_restored()


def test_a_dead_letter_whose_key_is_another_entry_here_is_refused_not_overwritten(product, tmp_path):
    document = backup_document()
    DeadLetter.objects.all().delete()
    other, _ = DeadLetter.enqueue("geo", "geo.lookup", {"q": "Paris"})
    document["sections"]["dead_letters"][0]["pk"] = other.pk

    with pytest.raises(InvalidBackup, match=f"primary key {other.pk} is another row in this database"):
        restore_backup(StringIO(json.dumps(document, cls=BackupEncoder)))

    assert DeadLetter.objects.get(pk=other.pk).handler_name == "geo.lookup"
    assert DeadLetter.objects.count() == 1


def test_restored_dead_letters_keep_their_schedule(product, tmp_path):
    due = timezone.now() + dt.timedelta(minutes=5)
    DeadLetter.objects.filter(handler_name="billing.charge").update(next_attempt_at=due, attempts=3)
    document = backup_document()
    wipe()

    restore_backup(StringIO(json.dumps(document, cls=BackupEncoder)))

    entry = DeadLetter.objects.get(handler_name="billing.charge")
    assert (entry.next_attempt_at, entry.attempts, entry.idempotency_key) == (due, 3, "order-42")


def test_restore_reads_stdin_given_a_dash(product, monkeypatch):
    document = json.dumps(backup_document(), cls=BackupEncoder)
    wipe()
    monkeypatch.setattr("sys.stdin", StringIO(document))

    out, _ = run("restore", "-")

    assert "integrations: 3 created" in out and Integration.objects.filter(name="billing").exists()
