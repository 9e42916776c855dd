"""A process that makes failing guarded calls with a dead letter, for the PostgreSQL restart scenario.

    python chaos_enqueuer.py                 # the load; environment below

Load mode: CHAOS_WORKER (its number), CHAOS_UPSTREAM (the upstream's URL),
CHAOS_READY and CHAOS_GO (files: written once Django is set up; start when it
exists), CHAOS_STOP (stop when it exists), CHAOS_OUT (one line per call:
"<idempotency key> <unix time> <outcome>"). Each call POSTs to the upstream's
/fail through the http Client, ``client.request("POST", ...,
dead_letter=DeadLetter("chaos.effect", ..., idempotency_key=...))``. The
DLQ subscriber logs what it spooled, replayed or could not store on stderr.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import django

NOT_STORED = "dead letter NOT STORED; recover it with DeadLetter.enqueue(**entry), entry="


def logged_entries(*logs: Path) -> list[dict]:
    """The entries the DLQ subscriber logged as not stored, in the order logged."""
    entries = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if NOT_STORED in line:
                entries.append(json.loads(line.split(NOT_STORED, 1)[1]))
    return entries


SPOOLED = re.compile(r"dead letter for \S+ \(handler \S+, idempotency key '([^']+)'\) spooled to ")
REPLAYED = re.compile(r"dead letter spool \S+ replayed: (\d+) stored")


def spooled_entries(*logs: Path) -> list[str]:
    """The idempotency keys of the entries the DLQ subscriber spooled, in the order logged."""
    return [match.group(1) for log in logs for match in SPOOLED.finditer(log.read_text(errors="replace"))]


def replayed_count(*logs: Path) -> int:
    """Entries the processes stored from their own spool files."""
    return sum(int(match.group(1)) for log in logs for match in REPLAYED.finditer(log.read_text(errors="replace")))


def load() -> None:
    from integrations.dlq import DeadLetter
    from integrations.errors import ResilienceError
    from integrations.http import Client
    from integrations.resilience import Engine, Policy, set_engine
    from integrations.resilience.registry import PolicyRegistry

    worker = int(os.environ["CHAOS_WORKER"])
    registry = PolicyRegistry()
    # forced closed: every call reaches the upstream and fails there, none is refused by an open breaker
    registry.put(Policy(name="chaos-dlq", max_retries=0, mode="forced_closed", attempt_timeout_ms=2000,
                        timeout_ms=3000))
    set_engine(Engine(registry=registry))  # the process's event bus: the DLQ app's subscriber stores dead letters
    client = Client("chaos-dlq", base_url=os.environ["CHAOS_UPSTREAM"])
    stop, go = Path(os.environ["CHAOS_STOP"]), Path(os.environ["CHAOS_GO"])
    Path(os.environ["CHAOS_READY"]).write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit("no go within 60 s")
        time.sleep(0.005)
    with open(os.environ["CHAOS_OUT"], "a", buffering=1) as out:
        n = 0
        while not stop.exists() and time.monotonic() < deadline:
            key = f"w{worker}-{n}"
            at = time.time()
            try:
                client.request("POST", "/fail", json={"n": n}, dead_letter=DeadLetter(
                    "chaos.effect", {"worker": worker, "n": n}, idempotency_key=key))
                outcome = "ok"
            except ResilienceError as exc:
                outcome = exc.category.value
            except Exception as exc:  # noqa: BLE001 - anything else reaching the caller is reported
                outcome = f"raised:{type(exc).__name__}"
            out.write(f"{key} {at:.6f} {outcome}\n")
            n += 1
            time.sleep(0.005)
    client.close()


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "resilience_site.settings")
    django.setup()
    load()
