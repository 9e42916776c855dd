"""The redrive in real processes: a django-q2 cluster (``manage.py qcluster``) and concurrent redrive runs.

The cluster uses the ORM broker without REDIS_URL and the Redis broker with
it, on a queue of its own (Q_CLUSTER_NAME) so no other cluster takes these
tasks. Processes share the test database (committed data: transaction=True)
and see the handlers of dlq_test_handlers, whose effects are files.
Backoffs are made tiny through the settings' environment variables.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

import dlq_test_handlers  # noqa: F401 - registers the dlq_test.* handlers in this process too
from dlq_support import database_url, enqueue
from integrations.dlq import DeadLetter as DeadLetterRequest
from integrations.dlq.models import DeadLetter
from integrations.models import Integration
from integrations.resilience import execute

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 60  # the longest any step may take before the test fails


def process_env(files: Path, **knobs) -> dict:
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": database_url(),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")])),
        "RESILIENCE_DLQ_HANDLER_MODULES": "dlq_test_handlers",
        "RESILIENCE_DLQ_BACKOFF_BASE_MS": "100",
        "RESILIENCE_DLQ_BACKOFF_MAX_MS": "400",
        "RESILIENCE_DLQ_RATE_PER_MINUTE": "0",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({key: str(value) for key, value in knobs.items()})
    return env


def wait_until(predicate, what: str, timeout_s: float = WAIT_S, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"{what}: not within {timeout_s} s\n{tail}")


def sleep_until(moment) -> None:
    time.sleep(max((moment - timezone.now()).total_seconds(), 0) + 0.05)


class Cluster:
    """``manage.py qcluster`` in its own process group, on a queue of its own."""

    def __init__(self, files: Path, **knobs) -> None:
        self.queue = f"dlq-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.log = files / "qcluster.log"
        env = process_env(files, Q_CLUSTER_NAME=self.queue, **knobs)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def queue_redrive(self) -> str:
        from django_q.tasks import async_task

        return async_task("integrations.dlq.tasks.redrive", cluster=self.queue)

    def redrive(self) -> dict:
        """Queue the redrive task and wait for the cluster to have run it; returns its report."""
        from django_q.tasks import fetch

        task_id = self.queue_redrive()
        task = wait_until(lambda: fetch(task_id), "the cluster runs the redrive task", log=self.log)
        assert task.success, task.result
        return task.result

    def stop(self) -> None:
        """SIGTERM to the cluster (it stops its workers); whatever is left of the group after 15 s is killed."""
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def tiny_backoff(settings):
    # what process_env gives the processes, for the entries this process enqueues
    settings.RESILIENCE_DLQ_BACKOFF_BASE_MS = 100
    settings.RESILIENCE_DLQ_BACKOFF_MAX_MS = 400


@pytest.fixture
def files(tmp_path):
    return tmp_path


@pytest.fixture
def start_cluster(files):
    clusters = []

    def start(**knobs) -> Cluster:
        cluster = Cluster(files, **knobs)
        clusters.append(cluster)
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


def calls(files: Path) -> list[tuple[int, int, int]]:
    log = files / "calls.log"
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []


def down():
    raise ConnectionError("billing is down")


def test_a_handler_failing_twice_then_succeeding_ends_succeeded_after_three_redrives(start_cluster, files):
    Integration.objects.create(name="billing", max_retries=0)
    result = execute("billing", down, dead_letter=DeadLetterRequest(
        "dlq_test.flaky", {"dir": str(files), "fail_times": 2}))
    assert not result.ok
    entry = DeadLetter.objects.get()
    assert (entry.integration_name, entry.handler_name, entry.last_error_category) == ("billing", "dlq_test.flaky",
                                                                                       "network")
    cluster = start_cluster()
    for _ in range(3):
        entry.refresh_from_db()
        sleep_until(entry.next_attempt_at)
        cluster.redrive()
    entry.refresh_from_db()
    assert (entry.status, entry.attempts) == ("succeeded", 3)
    assert [outcome["outcome"] for outcome in entry.history] == ["enqueued", "failed", "failed", "succeeded"]
    assert [attempt for _, attempt, _ in calls(files)] == [1, 2, 3]
    assert os.getpid() not in {pid for _, _, pid in calls(files)}  # run by the cluster's workers


def test_reaching_max_redrives_makes_it_dead(start_cluster, files):
    Integration.objects.create(name="billing", max_retries=0)
    entry = enqueue("dlq_test.flaky", {"dir": str(files), "fail_times": 99}, integration="billing", max_redrives=2)
    cluster = start_cluster()
    for _ in range(2):
        entry.refresh_from_db()
        sleep_until(entry.next_attempt_at)
        cluster.redrive()
    entry.refresh_from_db()
    assert (entry.status, entry.attempts, entry.last_error_category) == ("dead", 2, "network")
    assert len(calls(files)) == 2
    wait_until(lambda: f"dead letter #{entry.pk} of billing (handler dlq_test.flaky) is dead" in
               cluster.log.read_text(), "the death is logged for monitoring", log=cluster.log)


def test_the_installed_schedule_runs_the_redrive_in_the_cluster(start_cluster, files):
    from django_q.brokers import get_broker
    from django_q.scheduler import scheduler

    from integrations.schedules import install_schedules

    Integration.objects.create(name="billing")
    entry = enqueue("dlq_test.flaky", {"dir": str(files)}, integration="billing")
    install_schedules()
    cluster = start_cluster()
    sleep_until(entry.next_attempt_at)
    scheduler(broker=get_broker(cluster.queue))  # what the cluster's scheduler does every 30 s
    wait_until(lambda: DeadLetter.objects.filter(pk=entry.pk, status="succeeded").exists(),
               "the scheduled redrive runs", log=cluster.log)


def test_a_worker_killed_mid_handler_leaves_its_entry_to_be_redriven_after_the_lease_with_the_effect_applied_once(
        start_cluster, files):
    # A 1 s timeout makes the lease 1 + 5 s (LEASE_MARGIN_S).
    Integration.objects.create(name="billing", max_retries=0, attempt_timeout_ms=1000, timeout_ms=1000,
                               timeout_enforcement="inline")
    entry = enqueue("dlq_test.apply_once", {"dir": str(files), "effect": "charged order 7", "hang_s": 30},
                    integration="billing", idempotency_key="charge-order-7")
    cluster = start_cluster(RESILIENCE_DLQ_LEASE_S=1)
    sleep_until(entry.next_attempt_at)
    cluster.queue_redrive()
    marker = files / "in_handler"
    wait_until(lambda: marker.exists() and marker.read_text(), "the handler starts", log=cluster.log)
    killed = int(marker.read_text())
    os.kill(killed, signal.SIGKILL)

    entry.refresh_from_db()
    assert (entry.status, entry.attempts) == ("pending", 0)
    assert entry.claim_token is not None and entry.claimed_by.endswith(f":{killed}")
    assert cluster.redrive()["succeeded"] == 0  # its lease still holds: nobody takes it
    sleep_until(entry.lease_expires_at)
    assert cluster.redrive()["succeeded"] == 1

    entry.refresh_from_db()
    assert (entry.status, entry.attempts) == ("succeeded", 1)  # the killed run is noted, not a redrive spent
    assert (entry.history[1]["outcome"], entry.history[1]["error"]["code"]) == ("interrupted", "lease_expired")
    assert f":{killed} stopped before finishing" in entry.history[1]["error"]["message"]
    runs = calls(files)
    assert len(runs) == 2 and runs[0][2] == killed and runs[1][2] != killed
    assert (files / "effects.log").read_text().splitlines() == ["charge-order-7"]  # applied once
    assert (files / "effects" / "charge-order-7").read_text() == "charged order 7"


def test_two_redrive_processes_over_a_thousand_due_entries_run_each_exactly_once(files):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (set DATABASE_URL)")
    Integration.objects.create(name="billing", max_retries=0)
    due = timezone.now() - timedelta(seconds=1)
    DeadLetter.objects.bulk_create(
        DeadLetter(integration_name="billing", handler_name="dlq_test.flaky",
                   payload={"dir": str(files), "sleep_s": 0.001}, max_redrives=5, next_attempt_at=due)
        for _ in range(1000))
    go = files / "go"
    processes = []
    for n in range(2):
        env = process_env(files, DLQ_TEST_READY=files / f"ready-{n}", DLQ_TEST_GO=go,
                          RESILIENCE_DLQ_BATCH_SIZE=50)
        processes.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "dlq_redrive_process.py")],
                                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        wait_until(lambda: all((files / f"ready-{n}").exists() for n in range(2)), "both processes are ready")
        go.write_text("go")
        outputs = [process.communicate(timeout=WAIT_S) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    assert [process.returncode for process in processes] == [0, 0], outputs
    reports = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]

    runs = calls(files)
    per_entry = Counter(entry_id for entry_id, _, _ in runs)
    assert len(per_entry) == 1000 and set(per_entry.values()) == {1}  # each entry exactly once
    assert len({pid for _, _, pid in runs}) == 2  # and both processes took part
    assert sum(report["succeeded"] for report in reports) == 1000
    assert set(DeadLetter.objects.values_list("status", "attempts")) == {("succeeded", 1)}
