"""Gunicorn settings for production: several workers, one Prometheus view of them.

    gunicorn -c deploy/gunicorn.conf.py --workers 4 --bind 0.0.0.0:8000

(or WEB_CONCURRENCY=4). Each worker is its own process with its own metrics;
prometheus_client's multiprocess mode keeps every worker's values in files
under PROMETHEUS_MULTIPROC_DIR and /metrics merges them, whichever worker
answers the scrape. The variable must be set before a worker imports
prometheus_client, so this file, which the master reads before forking, sets
it: to the environment's value, or else to a directory private to this
master, removed at exit. docs/metrics.md explains the design.
"""

import os
import shutil
import tempfile
from pathlib import Path

wsgi_app = "resilience_site.wsgi:application"
# Threads keep client connections alive and overlap the waits on upstreams, Redis and the
# database; measured with benchmarks/load: 600-1,300 req/s against 300-580 for sync workers.
worker_class = "gthread"
threads = 4
chdir = str(Path(__file__).resolve().parent.parent)  # the project, whatever directory gunicorn starts in

# A private default is named after the master's pid, so a reload (SIGHUP re-reads this file) keeps it.
_private_metrics_dir = os.path.join(tempfile.gettempdir(), f"resilience-prometheus-{os.getpid()}")
metrics_dir = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", _private_metrics_dir)


def on_starting(server):
    """Start from no values: files left by an earlier run would be merged into this one's totals."""
    directory = Path(metrics_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for values_file in directory.glob("*.db"):
        values_file.unlink()


def child_exit(server, worker):
    """A dead worker's live gauges leave the merge; its counters stay in the totals, as counters must."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, metrics_dir)


def on_exit(server):
    if metrics_dir == _private_metrics_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
