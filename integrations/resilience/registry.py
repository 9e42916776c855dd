"""Policies by integration name, cached in the process.

A guarded call looks its policy up in a dict: no query. A policy is loaded
from its source (the ORM, wired in by the integrations app) on first use and
again after ``refresh_s``; a save in this process replaces it at once. If the
source fails on a reload, the process keeps the policy it has: a database
outage must not stop calls to every integration.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from django.core.exceptions import ImproperlyConfigured

from .policy import Policy

logger = logging.getLogger("integrations.registry")

PolicyLoader = Callable[[str], "Policy | None"]


class PolicyRegistry:
    def __init__(
        self,
        loader: PolicyLoader | None = None,
        creator: Callable[[str], Policy] | None = None,
        refresh_s: float = 30.0,
        auto_register: bool = False,
    ) -> None:
        self.loader = loader
        self.creator = creator
        self.refresh_s = refresh_s
        self.auto_register = auto_register
        self._policies: dict[str, tuple[Policy, float]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Policy:
        entry = self._policies.get(name)
        if entry is not None and time.monotonic() - entry[1] < self.refresh_s:
            return entry[0]
        return self._load(name, entry)

    def is_fresh(self, name: str) -> bool:
        """Whether get() can answer without touching the source (for async callers)."""
        entry = self._policies.get(name)
        return entry is not None and time.monotonic() - entry[1] < self.refresh_s

    def cached(self, name: str) -> Policy | None:
        """The policy held now, fresh or not, without loading it (an attempt reading its call's policy)."""
        entry = self._policies.get(name)
        return None if entry is None else entry[0]

    def put(self, policy: Policy) -> None:
        self._policies[policy.name] = (policy, time.monotonic())

    def invalidate(self, name: str) -> None:
        self._policies.pop(name, None)

    def _load(self, name: str, stale: tuple[Policy, float] | None) -> Policy:
        with self._lock:
            if self.loader is None:
                if stale is not None:
                    self.put(stale[0])
                    return stale[0]
                raise ImproperlyConfigured(
                    f"Unknown integration {name!r}: no policy was registered for it and no policy source is installed."
                )
            try:
                policy = self.loader(name)
            except Exception:
                if stale is None:
                    raise
                # keep serving the policy we have; try the source again after refresh_s
                logger.warning("could not reload the policy of %s; keeping the cached one", name, exc_info=True)
                self.put(stale[0])
                return stale[0]
            if policy is None:
                if not self.auto_register or self.creator is None:
                    self.invalidate(name)
                    raise ImproperlyConfigured(
                        f"Unknown integration {name!r}: create it in the admin (Integrations) or with "
                        f"`manage.py integrations import`, or set RESILIENCE_AUTO_REGISTER=True."
                    )
                policy = self.creator(name)
                logger.info("integration %s registered automatically with the %s preset", name, policy.kind)
            self.put(policy)
            return policy
