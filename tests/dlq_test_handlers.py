"""Dead letter handlers of the DLQ tests, registered in the test process and in the processes it starts.

Those processes (a django-q cluster, redrive runs) import this module through
RESILIENCE_DLQ_HANDLER_MODULES, so what the handlers do is written to files
under ``payload["dir"]``, which every process sees:

    calls.log     one line "<entry id> <attempt> <pid>" per handler call
    effects/      one file per idempotency key: the effect, applied once
    effects.log   one line per effect actually applied
    in_handler    written (with the pid) when apply_once first hangs
"""

import os
import time
from pathlib import Path

from integrations.dlq import dead_letter_handler


def _append(path: Path, line: str) -> None:
    # One write(2) per line with O_APPEND: lines from concurrent processes do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@dead_letter_handler("dlq_test.flaky", takes_context=True)
def flaky(payload, context):
    """Fails while the redrive attempt is <= payload["fail_times"], then succeeds."""
    _append(Path(payload["dir"]) / "calls.log", f"{context.entry_id} {context.attempt} {os.getpid()}")
    if payload.get("sleep_s"):
        time.sleep(payload["sleep_s"])
    if context.attempt <= payload.get("fail_times", 0):
        raise ConnectionError(f"upstream down (attempt {context.attempt})")
    return "done"


@dead_letter_handler("dlq_test.apply_once", takes_context=True)
def apply_once(payload, context):
    """Applies its effect once per idempotency key; the first call then hangs, to be killed mid-handler."""
    directory = Path(payload["dir"])
    _append(directory / "calls.log", f"{context.entry_id} {context.attempt} {os.getpid()}")
    (directory / "effects").mkdir(exist_ok=True)
    try:
        fd = os.open(directory / "effects" / context.idempotency_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass  # applied by an earlier run: an idempotent handler does not apply it again
    else:
        os.write(fd, payload["effect"].encode())
        os.close(fd)
        _append(directory / "effects.log", context.idempotency_key)
    marker = directory / "in_handler"
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(payload["hang_s"])
    return "applied"


@dead_letter_handler("dlq_test.noop")
def noop(payload):
    return None
