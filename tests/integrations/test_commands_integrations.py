"""``manage.py integrations {import,export} FILE``."""

import json
from io import StringIO

import pytest
import yaml
from django.core.management import CommandError, call_command

from integrations.models import Integration
from integrations.resilience.policy import KIND_PRESETS, KNOB_NAMES

pytestmark = pytest.mark.django_db

FIELDS = ("name", "kind", "description", *KNOB_NAMES)


def run(*args, **options):
    out = StringIO()
    call_command("integrations", *args, stdout=out, **options)
    return out.getvalue()


def rows():
    """Every integration as the fields the file format holds, plus when it was last saved."""
    return {i.name: ({f: getattr(i, f) for f in FIELDS}, i.updated_at) for i in Integration.objects.all()}


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture
def sample():
    Integration.objects.create(name="billing", kind="external_api", description="Payments", hourly_limit=1000,
                               failure_threshold=3, retry_budget_percent=None)
    Integration.objects.create(name="assistant", kind="ai_service", daily_limit=5000, jitter=False, capacity=0.5)


@pytest.mark.parametrize("extension", ["yaml", "yml", "json"])
def test_export_then_import_round_trips_every_field(sample, tmp_path, extension):
    before = rows()
    path = str(tmp_path / f"integrations.{extension}")
    assert run("export", path) == f"exported 2 integrations to {path}\n"
    Integration.objects.all().delete()
    out = run("import", path)
    assert out.splitlines() == ["created assistant", "created billing", "2 created, 0 updated, 0 unchanged"]
    assert {name: fields for name, (fields, _) in rows().items()} == {
        name: fields for name, (fields, _) in before.items()}


def test_export_writes_name_kind_description_and_every_knob_in_order(sample, tmp_path):
    path = tmp_path / "out.yaml"
    run("export", str(path))
    document = yaml.safe_load(path.read_text())
    assert document["version"] == 1
    assert [entry["name"] for entry in document["integrations"]] == ["assistant", "billing"]
    billing = document["integrations"][1]
    assert tuple(billing) == FIELDS
    assert (billing["hourly_limit"], billing["retry_budget_percent"]) == (1000, None)
    assert billing["description"] == "Payments"


def test_export_to_stdout_needs_a_format_and_writes_the_document(sample):
    with pytest.raises(CommandError, match="FILE is '-': say which format with --format yaml or --format json."):
        run("export", "-")
    document = json.loads(run("export", "-", "--format", "json"))
    assert [entry["name"] for entry in document["integrations"]] == ["assistant", "billing"]


def test_export_replaces_an_existing_file_whole_and_keeps_its_permissions(sample, tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old content that is longer than nothing" * 100)
    path.chmod(0o640)
    run("export", str(path))
    assert json.loads(path.read_text())["version"] == 1
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left beside it


def test_importing_the_same_file_twice_changes_nothing_the_second_time(sample, tmp_path):
    path = str(tmp_path / "integrations.yaml")
    run("export", path)
    before = rows()
    out = run("import", path)
    assert out.splitlines() == ["unchanged assistant", "unchanged billing", "0 created, 0 updated, 2 unchanged"]
    assert rows() == before  # not even saved again: updated_at is the same


def test_a_new_integration_given_only_a_kind_takes_the_kinds_preset(tmp_path):
    path = write(tmp_path / "new.yaml", "integrations:\n  - name: feed\n    kind: market_data\n")
    run("import", path)
    feed = Integration.objects.get(name="feed")
    assert {knob: getattr(feed, knob) for knob in KNOB_NAMES} == KIND_PRESETS["market_data"]
    assert run("import", path).splitlines()[0] == "unchanged feed"


def test_an_existing_integration_changes_only_the_fields_given(sample, tmp_path):
    billing_before = Integration.objects.get(name="billing")
    path = write(tmp_path / "change.json", json.dumps({"integrations": [
        {"name": "billing", "failure_threshold": 7, "description": "Payment provider"}]}))
    out = run("import", path)
    assert out.splitlines()[0] == ("updated billing: failure_threshold 3 -> 7, "
                                   "description 'Payments' -> 'Payment provider'")
    billing = Integration.objects.get(name="billing")
    assert (billing.failure_threshold, billing.description) == (7, "Payment provider")
    assert {k: getattr(billing, k) for k in KNOB_NAMES if k != "failure_threshold"} == {
        k: getattr(billing_before, k) for k in KNOB_NAMES if k != "failure_threshold"}


def test_a_dry_run_reports_what_would_change_and_writes_nothing(sample, tmp_path):
    before = rows()
    path = write(tmp_path / "dry.yaml", "integrations:\n  - name: billing\n    failure_threshold: 9\n"
                                        "  - name: new-one\n    kind: cache\n")
    out = run("import", path, "--dry-run")
    assert out.splitlines() == ["updated billing: failure_threshold 3 -> 9", "created new-one",
                                "1 created, 1 updated, 0 unchanged (dry run: nothing written)"]
    assert rows() == before


def test_import_reads_stdin_with_a_format(tmp_path):
    stdin = StringIO(json.dumps({"integrations": [{"name": "from-stdin", "kind": "database"}]}))
    assert run("import", "-", "--format", "json", stdin=stdin).splitlines()[0] == "created from-stdin"
    assert Integration.objects.filter(name="from-stdin", kind="database").exists()


BAD_ENTRIES = [
    ("integrations:\n  - name: billing\n    failure_threshold: 0\n",
     'bad.yaml: integration "billing": failure_threshold: Must be at least 1.'),
    ("integrations:\n  - name: billing\n    failur_threshold: 3\n",
     "bad.yaml: integration \"billing\": failur_threshold: Unknown field. Did you mean 'failure_threshold'?"),
    ("integrations:\n  - name: billing\n    max_retries: three\n",
     "bad.yaml: integration \"billing\": max_retries: Expected an integer, got 'three' (a string)."),
    ("integrations:\n  - name: billing\n    jitter: 1\n",
     'bad.yaml: integration "billing": jitter: Expected true or false, got 1.'),
    ("integrations:\n  - name: billing\n    capacity: true\n",
     'bad.yaml: integration "billing": capacity: Expected a finite number, got true (a boolean).'),
    ("integrations:\n  - name: billing\n    capacity: .nan\n",
     'bad.yaml: integration "billing": capacity: Expected a finite number, got nan.'),
    ("integrations:\n  - name: billing\n    window_size: null\n",
     'bad.yaml: integration "billing": window_size: This field cannot be null.'),
    ("integrations:\n  - kind: cache\n",
     "bad.yaml: integration #1: name: This field is required."),
    ("integrations:\n  - name: 42\n",
     "bad.yaml: integration #1: name: Expected a string, got 42."),
    ("integrations:\n  - name: 'no spaces'\n",
     "bad.yaml: integration \"no spaces\": name: Letters, digits, '.', '_' and '-' only, starting with a letter "
     "or digit."),
    ("integrations:\n  - name: billing\n  - name: other\n  - name: billing\n",
     'bad.yaml: integration "billing": name: Duplicate name: integrations #1 and #3 are both named "billing".'),
    ("integrations:\n  - name: billing\n    kind: databse\n",
     "bad.yaml: integration \"billing\": kind: Unknown kind 'databse'. Did you mean 'database'? Expected one of: "
     "database, ai_service, market_data, cache, external_api."),
    ("integrations:\n  - name: billing\n    base_delay_ms: 5000\n    max_delay_ms: 100\n",
     'bad.yaml: integration "billing": base_delay_ms: Base delay (5000 ms) must not exceed max delay (100 ms).'),
    ("integrations:\n  - name: billing\n    window_type: time\n",
     'bad.yaml: integration "billing": window_duration_s: A time window needs its duration: the seconds the rates '
     'are measured over (or choose the count window).'),
    ("integrations:\n  - name: billing\n    window_type: sliding\n",
     "bad.yaml: integration \"billing\": window_type: Value 'sliding' is not a valid choice."),
    ("integrations:\n  - name: billing\n    window_type: time\n    window_duration_s: 0\n",
     'bad.yaml: integration "billing": window_duration_s: Must be between 1 and 86400.'),
    ("integrations:\n  - name: billing\n    mode: sideways\n",
     "bad.yaml: integration \"billing\": mode: Value 'sideways' is not a valid choice."),
    ("integrations:\n  - [name, billing]\n",
     "bad.yaml: integration #1: expected a mapping of fields, got a list."),
]


@pytest.mark.parametrize("text, message", BAD_ENTRIES)
def test_a_bad_entry_is_named_by_file_integration_and_field(sample, tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(CommandError) as caught:
        run("import", path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{tmp_path}/{message}"
    assert lines[-1] == f"Nothing was imported: 1 error in {path}."


def test_every_error_of_a_file_is_reported_in_file_order(tmp_path):
    path = write(tmp_path / "bad.yaml", "integrations:\n"
                                        "  - name: a\n    failure_threshold: 0\n    nope: 1\n"
                                        "  - name: b\n    max_retries: -1\n")
    with pytest.raises(CommandError) as caught:
        run("import", path)
    assert str(caught.value).splitlines() == [
        f'{path}: integration "a": nope: Unknown field.',
        f'{path}: integration "a": failure_threshold: Must be at least 1.',
        f'{path}: integration "b": max_retries: Must be between 0 and 20.',
        f"Nothing was imported: 3 errors in {path}.",
    ]


def test_nothing_is_written_when_any_entry_is_bad(sample, tmp_path):
    before = rows()
    path = write(tmp_path / "mixed.yaml", "integrations:\n"
                                          "  - name: billing\n    failure_threshold: 9\n"
                                          "  - name: brand-new\n    kind: cache\n"
                                          "  - name: assistant\n    capacity: 2\n")
    with pytest.raises(CommandError, match='integration "assistant": capacity: Capacity must be in'):
        run("import", path)
    assert rows() == before


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "integrations:\n  - name: a\n   kind: cache\n",
     "bad.yaml: line 3, column 4: not valid YAML: expected <block end>, but found '<block mapping start>'."),
    ("bad.json", '{"integrations": [\n  {"name": "a",}\n]}',
     "bad.json: line 2, column 16: not valid JSON: Expecting property name enclosed in double quotes."),
    ("top.yaml", "- name: a\n", 'top.yaml: expected a mapping with an "integrations" list at the top, got a list.'),
    ("empty.yaml", "", 'empty.yaml: expected a mapping with an "integrations" list at the top, got nothing.'),
    ("key.yaml", "integration: []\n",
     "key.yaml: unknown top-level key 'integration'. Did you mean 'integrations'? Expected: version, integrations."),
    ("list.yaml", "integrations: {name: a}\n",
     'list.yaml: "integrations" must be a list of integrations, got a mapping.'),
    ("version.yaml", "version: 2\nintegrations: []\n", "version.yaml: version: this command reads version 1, got 2."),
])
def test_a_file_that_cannot_be_read_as_integrations_is_refused(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(CommandError) as caught:
        run("import", path)
    assert str(caught.value) == f"{tmp_path}/{message}"


def test_the_format_comes_from_the_extension_or_format(tmp_path):
    with pytest.raises(CommandError, match=r"data\.txt: cannot tell the format from the extension '\.txt'"):
        run("import", str(tmp_path / "data.txt"))
    path = write(tmp_path / "data.txt", '{"integrations": [{"name": "from-txt"}]}')
    assert run("import", path, "--format", "json").splitlines()[0] == "created from-txt"
    with pytest.raises(CommandError, match="FILE is '-': say which format"):
        run("import", "-")


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CommandError, match=r"missing\.yaml: no such file\."):
        run("import", str(tmp_path / "missing.yaml"))
