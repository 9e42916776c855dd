"""Dead letters the database refused, spooled to local disk and stored once it takes writes again.

The database's refusal is injected by making DeadLetter.enqueue raise OperationalError (what
Django raises when the server cannot be reached); tests/chaos/test_postgres_restart.py does the
same against a real PostgreSQL that is restarted and stopped under load.
"""

import json
import logging
import os
import threading

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, OperationalError, transaction

import dlq_test_handlers  # noqa: F401 - registers the dlq_test.* handlers
from integrations.dlq import DeadLetter as DeadLetterRequest
from integrations.dlq import spool, subscriber
from integrations.dlq.models import DeadLetter
from integrations.resilience import execute
from integrations.resilience.events import DeadLetterRequested


@pytest.fixture
def svc(make_engine, bus):
    bus.subscribe(DeadLetterRequested, subscriber.on_dead_letter_requested)
    return make_engine("svc", max_retries=0)


def down():
    raise ConnectionError("billing is down")


class Database:
    """DeadLetter.enqueue that raises OperationalError while ``down``, counting the refusals."""

    def __init__(self, monkeypatch):
        self.down = False
        self.refusals = 0
        real = DeadLetter.enqueue

        def enqueue(*args, **kwargs):
            if self.down:
                self.refusals += 1
                raise OperationalError("server closed the connection unexpectedly")
            return real(*args, **kwargs)

        monkeypatch.setattr(DeadLetter, "enqueue", enqueue)


def fail_with_dead_letter(order, **options):
    return execute("svc", down, dead_letter=DeadLetterRequest("dlq_test.noop", {"order": order}, **options))


def spooled_lines(directory):
    return [json.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_text().splitlines()]


@pytest.mark.django_db(transaction=True)
def test_a_dead_letter_the_database_refuses_is_spooled_then_stored_by_the_next_one(svc, monkeypatch,
                                                                                    dlq_spool_dir, caplog):
    database = Database(monkeypatch)
    database.down = True
    with caplog.at_level(logging.WARNING, logger="integrations.dlq"):
        assert not fail_with_dead_letter(1).ok
        assert not fail_with_dead_letter(2).ok
    assert database.refusals == 4  # each tried again once on a fresh connection
    assert [entry["payload"] for entry in spooled_lines(dlq_spool_dir)] == [{"order": 1}, {"order": 2}]
    assert not DeadLetter.objects.exists()
    assert "spooled to" in caplog.text and "NOT STORED" not in caplog.text

    database.down = False
    fail_with_dead_letter(3)
    assert sorted(entry.payload["order"] for entry in DeadLetter.objects.all()) == [1, 2, 3]
    assert list(dlq_spool_dir.iterdir()) == []


@pytest.mark.django_db(transaction=True)
def test_a_write_that_meets_a_closed_connection_is_stored_on_a_fresh_one(svc, monkeypatch, dlq_spool_dir):
    database = Database(monkeypatch)
    real = DeadLetter.enqueue

    def closed_once(*args, **kwargs):
        database.down = database.refusals == 0
        return real(*args, **kwargs)

    monkeypatch.setattr(DeadLetter, "enqueue", closed_once)
    fail_with_dead_letter(1)
    assert database.refusals == 1
    assert DeadLetter.objects.get().payload == {"order": 1}
    assert not dlq_spool_dir.exists()


@pytest.mark.django_db
def test_inside_the_callers_transaction_a_refused_dead_letter_is_logged_not_spooled(svc, monkeypatch,
                                                                                    dlq_spool_dir, caplog):
    Database(monkeypatch).down = True
    with caplog.at_level(logging.ERROR, logger="integrations.dlq"), transaction.atomic():
        fail_with_dead_letter(1)
    assert not dlq_spool_dir.exists()  # the caller's transaction fails with the database: no outbox row to keep
    assert "dead letter NOT STORED" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_row_the_database_refuses_for_good_is_logged_not_spooled(svc, monkeypatch, dlq_spool_dir, caplog):
    def refused(*args, **kwargs):
        raise IntegrityError("value too long")

    monkeypatch.setattr(DeadLetter, "enqueue", refused)
    with caplog.at_level(logging.ERROR, logger="integrations.dlq"):
        fail_with_dead_letter(1)
    assert not dlq_spool_dir.exists()  # it would be refused again at every replay
    assert "dead letter NOT STORED" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_the_scheduled_redrive_and_the_command_replay_every_file_of_the_host(svc, monkeypatch, dlq_spool_dir):
    database = Database(monkeypatch)
    database.down = True
    fail_with_dead_letter(1, idempotency_key="order-1")
    fail_with_dead_letter(2)
    # another process of this host, gone, left a file too; one of its entries is already stored
    other = dlq_spool_dir / "web-1-99999999.jsonl"
    other.write_text(json.dumps(spool_entry(3)) + "\n" + json.dumps(spool_entry(1, idempotency_key="order-1")) + "\n")
    database.down = False
    call_command("dlq", "stats", stdout=(out := _Out()))
    assert "spooled on this host, waiting for the database: 4" in out.text
    from integrations.dlq import tasks

    assert tasks.redrive()["spool"] == {"stored": 3, "already_there": 1, "files": 2, "left": 0}
    assert sorted(entry.payload["order"] for entry in DeadLetter.objects.all()) == [1, 2, 3]
    call_command("dlq", "replay", stdout=(out := _Out()))
    assert "0 stored, 0 already there, 0 left" in out.text


def spool_entry(order, **extra):
    return {"integration": "svc", "handler": "dlq_test.noop", "payload": {"order": order}, "error": None,
            "attempts": 1, "idempotency_key": extra.get("idempotency_key"), "max_redrives": None}


class _Out:
    def __init__(self):
        self.text = ""

    def write(self, text, *args, **kwargs):
        self.text += text

    def flush(self):
        pass


@pytest.mark.django_db(transaction=True)
def test_a_replay_that_meets_the_database_down_stores_nothing_of_the_file_and_keeps_it(monkeypatch,
                                                                                      dlq_spool_dir):
    dlq_spool_dir.mkdir(parents=True)
    (dlq_spool_dir / "web-1-99999999.jsonl").write_text(
        "".join(json.dumps(spool_entry(n)) + "\n" for n in range(3)))
    calls = []
    real = spool._enqueue

    def fails_on_the_third(entry):
        calls.append(entry)
        if len(calls) == 3:
            raise OperationalError("the database went away again")
        return real(entry)

    monkeypatch.setattr(spool, "_enqueue", fails_on_the_third)
    assert spool.replay() == {"stored": 0, "already_there": 0, "files": 0, "left": 3}
    assert not DeadLetter.objects.exists()  # one transaction: the first two were rolled back
    with pytest.raises(CommandError, match="3 spooled dead letter"):
        monkeypatch.setattr(spool, "_enqueue", lambda entry: (_ for _ in ()).throw(OperationalError("down")))
        call_command("dlq", "replay", stdout=_Out())
    monkeypatch.setattr(spool, "_enqueue", real)
    assert spool.replay() == {"stored": 3, "already_there": 0, "files": 1, "left": 0}
    assert list(dlq_spool_dir.iterdir()) == []


@pytest.mark.django_db(transaction=True)
def test_a_torn_line_is_kept_aside_and_the_rest_is_stored(dlq_spool_dir, caplog):
    dlq_spool_dir.mkdir(parents=True)
    (dlq_spool_dir / "web-1-99999999.jsonl").write_text(json.dumps(spool_entry(1)) + '\n{"integration": "sv')
    with caplog.at_level(logging.ERROR, logger="integrations.dlq"):
        assert spool.replay()["stored"] == 1
    assert (dlq_spool_dir / "web-1-99999999.jsonl.bad").read_text() == '{"integration": "sv\n'
    assert "1 unreadable line(s)" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_file_claimed_by_a_live_process_is_left_and_one_claimed_by_a_dead_process_is_taken_over(dlq_spool_dir):
    dlq_spool_dir.mkdir(parents=True)
    live = dlq_spool_dir / f"web-1-5.jsonl.replaying-{os.getppid()}"
    dead = dlq_spool_dir / "web-1-6.jsonl.replaying-99999999"
    live.write_text(json.dumps(spool_entry(1)) + "\n")
    dead.write_text(json.dumps(spool_entry(2)) + "\n")
    assert spool.replay()["stored"] == 1
    assert DeadLetter.objects.get().payload == {"order": 2}
    assert live.exists() and not dead.exists()


def test_lines_written_while_replays_claim_the_file_are_each_replayed_once(monkeypatch, dlq_spool_dir):
    replayed = []
    monkeypatch.setattr(spool, "_enqueue", lambda entry: (replayed.append(entry["payload"]["n"]), (None, True))[1])
    monkeypatch.setattr(transaction, "atomic", _no_transaction)  # files only: no database in this test
    done = threading.Event()

    def replaying():
        while not done.is_set():
            spool.replay()

    replayer = threading.Thread(target=replaying)
    replayer.start()
    try:
        for n in range(500):
            spool.spool({"payload": {"n": n}})
    finally:
        done.set()
        replayer.join(10)
    spool.replay()
    assert sorted(replayed) == list(range(500))


class _no_transaction:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
