"""The real settings plus the load-only URLs (urls.py) and where the local upstream listens.

Layered on resilience_site.settings as tests/metrics_probe_site is: everything
the deployed site reads from the environment (DATABASE_URL, REDIS_URL,
RESILIENCE_RATE_LIMITS, ...) is read there, unchanged; run.py sets them.
"""

from resilience_site.settings import *  # noqa: F403 - the deployed site, unchanged
from resilience_site.settings import env_str

ROOT_URLCONF = "benchmarks.load.urls"

# The upstream run.py started (benchmarks/load/upstream.py), and the integration guarding it.
LOAD_UPSTREAM_URL = env_str("LOAD_UPSTREAM_URL", "http://127.0.0.1:18080")
LOAD_INTEGRATION = env_str("LOAD_INTEGRATION", "load_upstream")
