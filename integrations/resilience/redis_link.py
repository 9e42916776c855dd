"""One process's link to Redis: the client, an outage, and the thread that sends what was deferred.

The shared breaker and quota store (``redis_store.RedisStore``) and the inbound rate limiter it
hands out (``rate_limit.RedisRateLimiter``) talk to Redis through one RedisLink, so that

- a process has one client and one connection pool, whatever uses it: one server, a Sentinel
  service's primary or a Cluster, whichever the URL names (redis_connect.py), with bounded
  timeouts and no retries of the client's own, so a slow Redis costs a caller one timeout;
- an outage is one outage: if Redis cannot be reached, each user of the link goes on with
  per-process state, the log says so once (and once when it is back) and a SharedStateChanged
  event is published; Redis is tried again every ``retry_interval_s`` and shared state resumes by
  itself. No exception reaches a caller because Redis is down;
- one flusher thread per process (a forked child starts its own) sends, every
  ``flush_interval_s``, what each user deferred: the store's fast successes, the limiter's
  lease settlements.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

import redis

from .events import EventBus, SharedStateChanged
from .redis_connect import DEFAULT_CONNECT_TIMEOUT_S, connect, parse_url

logger = logging.getLogger("integrations.shared_state")

# Errors that mean "Redis is not there": anything else (a script error) is a bug and is raised.
# Besides a connection lost or a timeout: a Cluster with a slot no master serves (CLUSTERDOWN, a
# failover in progress, a node not reachable to read the topology from), a slot being migrated
# (TRYAGAIN), and a server that became a replica under a plain redis:// URL (READONLY: the store
# cannot write there; a Sentinel client turns that into a ConnectionError itself).
UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ClusterDownError,
               redis.exceptions.RedisClusterException, redis.exceptions.TryAgainError,
               redis.exceptions.ReadOnlyError)


class RedisLink:
    def __init__(
        self,
        url: str | None,
        *,
        client: redis.Redis | None,
        clock,
        bus: EventBus,
        retry_interval_s: float,
        flush_interval_s: float,
        socket_timeout_s: float,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        self.client = client or connect(parse_url(url), connect_timeout_s=min(connect_timeout_s, socket_timeout_s),
                                        socket_timeout_s=socket_timeout_s)
        self.clock = clock
        self.bus = bus
        self.retry_interval_s = retry_interval_s
        self.flush_interval_s = flush_interval_s
        self.socket_timeout_s = socket_timeout_s
        self.available = True
        self._retry_at = 0.0
        self._down_since = 0.0
        self._outage_lock = threading.Lock()
        self._flushes: list[Callable[[], None]] = []
        self._flusher_lock = threading.Lock()
        self._flusher_pid = 0

    # -- outages ------------------------------------------------------------------------

    def waiting(self) -> bool:
        """Redis was found unreachable and is not to be tried again yet: go per process at once."""
        return not self.available and time.monotonic() < self._retry_at

    def call(self, command: Callable, *args, **kwargs):
        """``command(*args, **kwargs)``'s reply, or None when Redis is unreachable (now, or still
        within the retry interval of the last failure): the caller goes per process.

        Only for commands that never reply nil (the scripts, MGET, a pipeline's execute).
        """
        if self.waiting():
            return None
        try:
            reply = command(*args, **kwargs)
        except UNREACHABLE as exc:
            self.lost(exc)
            return None
        if not self.available:
            self.regained()
        return reply

    def lost(self, exc: Exception) -> None:
        with self._outage_lock:
            self._retry_at = time.monotonic() + self.retry_interval_s
            if not self.available:
                return
            self.available = False
            self._down_since = time.monotonic()
        logger.warning("shared state unavailable (%s: %s); breakers, quotas and rate limits are per process "
                       "until Redis is back", type(exc).__name__, exc)
        self.bus.publish(SharedStateChanged(shared=False, reason=str(exc), at=self.clock.time()))

    def regained(self) -> None:
        with self._outage_lock:
            if self.available:
                return
            self.available = True
            outage = time.monotonic() - self._down_since
        logger.warning("shared state back after %.1f s; breakers, quotas and rate limits are shared again", outage)
        self.bus.publish(SharedStateChanged(shared=True, reason=f"back after {outage:.1f} s", at=self.clock.time()))

    # -- the flusher --------------------------------------------------------------------

    def on_flush(self, flush: Callable[[], None]) -> None:
        """Have the flusher thread call ``flush`` every ``flush_interval_s`` (once it runs)."""
        self._flushes.append(flush)

    def ensure_flusher(self) -> None:
        """Start this process's flusher thread, unless it runs already."""
        if self._flusher_pid == os.getpid():
            return
        with self._flusher_lock:
            if self._flusher_pid == os.getpid():
                return
            self._flusher_pid = os.getpid()  # a forked child starts its own
            threading.Thread(target=self._flush_forever, name="shared-state-flusher", daemon=True).start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self.flush_interval_s)
            for flush in self._flushes:
                try:
                    flush()
                except Exception:  # noqa: BLE001 - the flusher must outlive any one failure; it is logged
                    logger.exception("flushing deferred outcomes to shared state failed")


def unique_id() -> str:
    """A name for a lease or a counted request in Redis.

    Random, not host:pid:counter: two stores in one process, or one inherited across a fork,
    would reuse such names and a lease or a counted request would overwrite another.
    """
    return uuid.uuid4().hex
