"""Dead letters the database could not take, kept on local disk until it can.

When a dead letter's write fails because the database cannot be reached (a
restart, a failover, a connection the server closed) and the write was not part of the
caller's transaction, the subscriber appends the entry, one JSON line, to this
process's file in RESILIENCE_DLQ_SPOOL_DIR (``<host>-<pid>.jsonl``, fsynced)
and logs a warning. ``replay()`` stores spooled entries later, in order:

- in the same process, after its next dead letter is stored (the database is back);
- in every scheduled redrive (``dlq.redrive``), for every file of the directory;
- with ``manage.py dlq replay``.

A replay claims a file by renaming it (``<name>.replaying-<pid>``), so two
processes never replay one file; a claim whose process has died is taken over.
A file's entries are stored in one transaction and the file is then removed:
if the database fails again, nothing of the file is stored and it is given
back for the next replay. The one window for a double is a crash between that
commit and the removal; an entry with an idempotency key is never doubled.
A line that is not an entry (a write torn by a crash) is kept aside in
``<name>.bad`` and logged; an entry the database refuses for good (not for
being unreachable) is logged for recovery by hand, as the subscriber does. The spool is per host: a host's files are replayed
by processes of that host (docs/dlq.md).

Inside the caller's transaction a failed write is not spooled: the caller's
transaction fails with it and rolls back the work the dead letter describes
(the queue is a transactional outbox), so the entry is only logged.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import uuid
from pathlib import Path

from django.db import InterfaceError, OperationalError, transaction
from .conf import dlq_settings

logger = logging.getLogger("integrations.dlq")

# The database could not be reached (a restart, a failover, a closed connection): worth spooling,
# unlike a row it refused (too long, a constraint), which would be refused again at every replay.
UNREACHABLE = (OperationalError, InterfaceError)
_CLAIM = ".replaying-"
_spooled_here = False  # this process wrote to its file since its last replay of it


def spool_dir() -> Path | None:
    """RESILIENCE_DLQ_SPOOL_DIR, or None when spooling is turned off (empty setting)."""
    configured = dlq_settings.SPOOL_DIR
    return Path(configured) if configured else None


def own_file(directory: Path) -> Path:
    return directory / f"{socket.gethostname()}-{os.getpid()}.jsonl"


def spool(entry: dict) -> Path:
    """Append ``entry`` to this process's spool file, durably; returns the file.

    OSError (no directory, a full disk) is the caller's to report: the entry is then not kept.
    """
    global _spooled_here
    directory = spool_dir()
    if directory is None:
        raise OSError("RESILIENCE_DLQ_SPOOL_DIR is empty: spooling is turned off")
    directory.mkdir(parents=True, exist_ok=True)
    path = own_file(directory)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # a replay may have claimed (renamed) the file between open and lock: write to a new one
            if _same_file(fd, path):
                os.write(fd, line)
                os.fsync(fd)
                _spooled_here = True
                return path
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def replay_own() -> dict:
    """Replay this process's file, if it spooled anything (after a successful write: the database is back)."""
    global _spooled_here
    directory = spool_dir()
    if not _spooled_here or directory is None:
        return {"stored": 0, "already_there": 0, "files": 0, "left": 0}
    _spooled_here = False
    return replay([own_file(directory)])


def replay(paths: list[Path] | None = None) -> dict:
    """Store spooled entries: those of ``paths``, or of every file in the spool directory.

    Returns counts: entries stored, entries already there (same idempotency key), files
    replayed, entries left for a later replay (the database failed again).
    """
    directory = spool_dir()
    report = {"stored": 0, "already_there": 0, "files": 0, "left": 0}
    if directory is None or not directory.is_dir():
        return report
    for path in paths if paths is not None else _replayable(directory):
        claimed = _claim(path)
        if claimed is None:
            continue
        entries = _read(claimed)
        try:
            with transaction.atomic():
                created = [was_created for was_created in map(_enqueue_or_log, entries) if was_created is not None]
        except UNREACHABLE as exc:
            # the database failed again: the file waits for the next replay
            report["left"] += len(entries)
            _give_back(claimed, directory)
            logger.warning("dead letter spool %s not replayed (%s: %s); %d entries kept for the next replay",
                           claimed.name, type(exc).__name__, exc, len(entries))
            continue
        claimed.unlink()
        report["files"] += 1
        report["stored"] += sum(created)
        report["already_there"] += len(created) - sum(created)
        logger.warning("dead letter spool %s replayed: %d stored, %d already there",
                       path.name, sum(created), len(created) - sum(created))
    return report


def pending(directory: Path | None = None) -> int:
    """How many entries wait in the spool directory (files of every process of this host)."""
    directory = directory or spool_dir()
    if directory is None or not directory.is_dir():
        return 0
    return sum(_count_lines(path) for path in directory.iterdir()
               if path.suffix == ".jsonl" or _CLAIM in path.name)


def _enqueue(entry: dict):
    from .models import DeadLetter

    return DeadLetter.enqueue(**entry)


def _enqueue_or_log(entry: dict) -> bool | None:
    """Whether the entry was created (False: already there); None if the database refused it for good."""
    try:
        return _enqueue(entry)[1]
    except UNREACHABLE:
        raise
    except Exception:  # noqa: BLE001 - a refused entry must not hold back the rest of its file; logged in full
        log_not_stored(entry)
        return None


def log_not_stored(entry: dict) -> None:
    """Log, at ERROR with the traceback being handled, everything needed to store ``entry`` by hand."""
    logger.error("dead letter NOT STORED; recover it with DeadLetter.enqueue(**entry), entry=%s",
                 json.dumps(entry, default=repr, sort_keys=True), exc_info=True)


def _replayable(directory: Path) -> list[Path]:
    paths = []
    for path in sorted(directory.iterdir()):
        if path.name.endswith(".jsonl"):
            paths.append(path)
        elif _CLAIM in path.name and not _alive(path.name.rsplit(_CLAIM, 1)[1]):
            paths.append(path)  # claimed by a process that died mid-replay
    return paths


def _alive(pid_text: str) -> bool:
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True  # another user's process, or a name we did not write: leave it
    return True


def _claim(path: Path) -> Path | None:
    base = path.name.split(_CLAIM, 1)[0]
    claimed = path.with_name(f"{base}{_CLAIM}{os.getpid()}")
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return None  # another process claimed it first, or there was nothing to replay
    # wait for a writer that opened the file before the rename to finish its line
    fd = os.open(claimed, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)
    return claimed


def _read(claimed: Path) -> list[dict]:
    entries, bad = [], []
    for line in claimed.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
            continue
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            bad.append(line)
    if bad:
        aside = claimed.with_name(claimed.name.split(_CLAIM, 1)[0] + ".bad")
        with open(aside, "a") as out:
            out.writelines(f"{line}\n" for line in bad)
        logger.error("dead letter spool %s: %d unreadable line(s) kept aside in %s", claimed.name, len(bad), aside)
    return entries


def _give_back(claimed: Path, directory: Path) -> None:
    base = claimed.name.split(_CLAIM, 1)[0].removesuffix(".jsonl")
    os.rename(claimed, directory / f"{base}-returned-{uuid.uuid4().hex[:12]}.jsonl")


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    except FileNotFoundError:
        return 0
