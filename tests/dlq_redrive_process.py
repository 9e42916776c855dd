"""A redrive process for the DLQ concurrency test: waits at a barrier, then runs the scheduled task once.

    DLQ_TEST_READY=<file> DLQ_TEST_GO=<file> python tests/dlq_redrive_process.py

Writes DLQ_TEST_READY once Django is set up, runs ``integrations.dlq.tasks.redrive``
as soon as DLQ_TEST_GO exists (so both processes start together), and prints
the run's report as JSON.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "resilience_site.settings")

import django  # noqa: E402

django.setup()

from integrations.dlq.tasks import redrive  # noqa: E402

Path(os.environ["DLQ_TEST_READY"]).write_text(str(os.getpid()))
go = Path(os.environ["DLQ_TEST_GO"])
deadline = time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("no go signal within 60 s")
    time.sleep(0.005)
print(json.dumps(redrive()))
