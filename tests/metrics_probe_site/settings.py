"""The real settings; only the URLs differ (they add the probe)."""

from resilience_site.settings import *  # noqa: F403 - the deployed site, unchanged

ROOT_URLCONF = "metrics_probe_site.urls"
