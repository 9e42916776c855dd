"""Response cache and last known values: an in-process L1 in front of a Django cache.

A fresh entry (younger than the integration's ``cache_ttl_s``) is served
without calling the upstream. Entries stay ``RESILIENCE_CACHE_STALE_S`` past
their TTL so ``Fallback.cache()`` can serve them when the upstream fails.
Last known good values are kept longer (``RESILIENCE_LAST_KNOWN_TTL_S``) for
``Fallback.last_known()``. Keys are SHA-256 of the integration and the call's
parameters. A cache backend that fails is treated as a miss: the call goes on.

What protects the upstream (docs/pipeline.md, "Cache"):

- **One fill per key.** Concurrent misses for one key make one upstream call:
  the first call in a process fills it (a ``Flight`` the others of the process
  wait on), and takes the fleet's fill lock, a short key added in the shared
  cache (``SET NX PX`` on Redis) that lives no longer than the filler's
  deadline. A call that finds the key being filled serves the stale entry if
  there is one, else waits for the fill, never past its own deadline.
- **Stale-while-revalidate.** Past ``cache_soft_ttl_s`` (and before
  ``cache_ttl_s``) the entry is served and refreshed once in the background:
  once per process (a mark) and once per fleet (the same fill lock).
- **Two levels.** Responses are kept in this process (L1, pickled, at most
  ``local_entries``) in front of the shared cache. Clearing a key, a prefix or
  a whole integration writes the integration's invalidation record in the
  shared cache: a generation and the clears made at each. Every entry carries
  the generation it was written under; a clear made since, that matches it,
  hides it. A shared read fetches the record with the entry (one round trip);
  an L1 hit trusts the process's view of the record for ``view_s`` (0.5 s), so
  a clear reaches every process within a second, on any cache backend shared
  by the processes (without one, each process has its own).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from .policy import Policy
from .redis_link import unique_id

logger = logging.getLogger("integrations.cache")

MISSING = object()

RESPONSE, LAST_KNOWN = "rc", "lk"
ALL, PREFIX, KEY = "all", "prefix", "key"
MAX_CLEARS = 200  # the record keeps this many partial clears; older ones become one clear of everything
_FILL_MIN_S = 0.05  # the shortest a fill lock lives
_POLL_S = 0.01  # how often a call waiting for another process's fill looks for its entry
# How long past its filler's deadline a Flight is waited for: the filler settles it as its call ends
# (a value, an error, or given up), which takes a few ms past the deadline it stopped at. Only a
# filler that never settles (a bug) is waited for this long, and no waiter past its own deadline.
_FLIGHT_GRACE_S = 1.0


def key_material(fn, args: tuple, kwargs: dict, cache_key: Any) -> str | None:
    """Canonical JSON of what identifies a call, or None when it cannot be cached.

    An explicit ``cache_key`` must be JSON-serialisable (a programming error
    otherwise); without one, a named function (or a partial of one) and its
    arguments are used when the arguments are plain data.
    ``cache_key=False`` turns caching off for the call.
    """
    if cache_key is False:
        return None
    if cache_key is not None:
        try:
            return json.dumps(cache_key, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"cache_key must be JSON-serialisable: {exc}") from exc
    while isinstance(fn, functools.partial):
        args, kwargs = fn.args + tuple(args), {**fn.keywords, **kwargs}
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    if name is None or "<lambda>" in name:
        return None  # a callable object or a lambda: nothing stable names it across processes
    try:
        return json.dumps([fn.__module__, name, args, kwargs], sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None  # arguments that are not plain data: this call is not cached


def _digest(policy: Policy, material: str) -> str:
    return hashlib.sha256(f"{policy.name}\x00{material}".encode()).hexdigest()


def hashed_key(kind: str, policy: Policy, material: str) -> str:
    # {name}: a Redis Cluster hash tag, so an integration's entries, record and locks share a slot
    return f"resilience:{kind}:{{{policy.name}}}:{policy.cache_version}:{_digest(policy, material)}"


def record_key(name: str) -> str:
    return f"resilience:inv:{{{name}}}"


def fill_key(policy: Policy, material: str) -> str:
    return f"resilience:fill:{{{policy.name}}}:{_digest(policy, material)}"


class CacheUnavailable(RuntimeError):
    """A clear could not be recorded: the shared cache failed (nothing was cleared)."""


@dataclass(frozen=True)
class Clear:
    """One clear in an integration's invalidation record: entries older than ``generation`` it matches are gone."""

    generation: int
    scope: str  # ALL, PREFIX or KEY
    text: str  # the prefix, or the key's material; "" for ALL
    at: float  # wall clock, to forget clears older than any entry can be

    def hides(self, material: str) -> bool:
        if self.scope == ALL:
            return True
        if self.scope == KEY:
            return material == self.text
        return material.startswith(self.text)


@dataclass(frozen=True)
class Invalidations:
    generation: int = 0
    clears: tuple[Clear, ...] = ()

    def hides(self, material: str, written_under: int) -> bool:
        if written_under >= self.generation:
            return False
        return any(clear.generation > written_under and clear.hides(material) for clear in self.clears)


NO_CLEARS = Invalidations()


def prefix_material(prefix: str) -> str:
    """What a string cache key's material starts with when the key starts with ``prefix``."""
    return json.dumps(prefix)[:-1]


class _OncePerInterval:
    """Logs a backend failure once, then at most once a minute, not on every call."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last = 0.0
        self._lock = threading.Lock()

    def warn(self, message: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                return
            self._last = now
        logger.warning(message, *args, exc_info=True)


class Flight:
    """One key being filled in this process: the other calls of the process wait on it.

    Its outcome is a Lookup (the value stored, or the filler's error), or None when the
    filler gave up without one (those waiting look again).
    """

    __slots__ = ("key", "expires", "done", "outcome", "_futures", "_lock")

    def __init__(self, key: str, expires: float) -> None:
        self.key = key
        self.expires = expires  # monotonic: a filler that vanished is not waited for past its deadline
        self.done = threading.Event()
        self.outcome: Lookup | None = None
        self._futures: list = []
        self._lock = threading.Lock()

    def resolve(self, outcome: Lookup | None) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.outcome = outcome
            self.done.set()
            futures, self._futures = self._futures, []
        for loop, future in futures:
            loop.call_soon_threadsafe(_wake, future)

    def wait(self, timeout: float) -> bool:
        return self.done.wait(max(timeout, 0.0))

    async def await_(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self.done.is_set():
                return True
            self._futures.append((loop, future))
        try:
            await asyncio.wait_for(future, max(timeout, 0.0))
        except asyncio.TimeoutError:
            return self.done.is_set()
        return True


def _wake(future) -> None:
    if not future.done():
        future.set_result(None)


class Fill:
    """This call fills a key: it holds the key's Flight and, once taken, the fleet's fill lock."""

    __slots__ = ("policy", "material", "key", "flight", "token", "settled")

    def __init__(self, policy: Policy, material: str, key: str, flight: Flight) -> None:
        self.policy = policy
        self.material = material
        self.key = key
        self.flight = flight
        self.token: str | None = None  # the fleet lock's value while this process holds it
        self.settled = False


class Lookup:
    """What the cache step found for one call.

    ``hit`` (value, stored_at): serve it (``refresh``: and refresh it in the background);
    ``fill``: this call fills the key (go live, then ``settle``); ``waiting``: another call fills it,
    ``ResponseCache.wait`` for it; ``error``: the filler failed with it; none of them: the wait
    reached the call's deadline.
    """

    __slots__ = ("hit", "refresh", "fill", "waiting", "error", "policy", "material", "stored")

    def __init__(self, policy=None, material=None, *, hit=None, refresh=False, fill=None, waiting=None, error=None,
                 stored=None):
        self.policy = policy
        self.material = material
        self.hit = hit
        self.refresh = refresh
        self.fill = fill
        self.waiting = waiting  # a Flight of this process, or a Fill whose fleet lock another process holds
        self.error = error
        self.stored = stored  # a fill's outcome: (stored_at, payload), unpickled by each call waiting for it

    def for_waiter(self) -> Lookup:
        """This outcome of a fill as one waiting call gets it: a value of its own, as a cache hit would give."""
        if self.stored is None:
            return self
        stored_at, payload = self.stored
        return Lookup(self.policy, self.material, hit=(_loads(payload), stored_at))


class ResponseCache:
    def __init__(self, alias: str = "default", stale_s: int = 3600, last_known_ttl_s: int = 604800,
                 local_entries: int = 1024, view_s: float = 0.5, refresh_workers: int = 4,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.alias = alias
        self.monotonic = monotonic  # how old this process's view of a record is (a test may drive it)
        self.stale_s = stale_s
        self.last_known_ttl_s = last_known_ttl_s
        self.local_entries = local_entries
        self.view_s = view_s
        self.refresh_workers = refresh_workers
        self._warn = _OncePerInterval()
        self._lock = threading.Lock()
        self._local: OrderedDict[str, tuple] = OrderedDict()  # key -> (name, stored_at, generation, payload, expires)
        self._views: dict[str, tuple[Invalidations, float]] = {}  # name -> (record, monotonic when read)
        self._flights: dict[str, Flight] = {}
        self._refreshing: dict[str, float] = {}  # key -> monotonic until which this process refreshes it
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = 0

    @property
    def backend(self):
        from django.core.cache import caches

        return caches[self.alias]

    # -- reading ---------------------------------------------------------------------------

    def _get_many(self, keys: list[str]) -> dict | None:
        try:
            return self.backend.get_many(keys)
        except Exception:  # noqa: BLE001 - any backend failure is a miss: the cache must never fail a call
            self._warn.warn("response cache %r unreadable; serving live", self.alias)
            return None

    def _view(self, name: str) -> Invalidations:
        """This process's view of the integration's invalidation record, read again after view_s."""
        seen = self._views.get(name)
        now = self.monotonic()
        if seen is not None and now - seen[1] < self.view_s:
            return seen[0]
        found = self._get_many([record_key(name)])
        if found is None:
            record = seen[0] if seen is not None else NO_CLEARS
        else:
            record = found.get(record_key(name), NO_CLEARS)
        self._views[name] = (record, now)
        return record

    def _read(self, kind: str, policy: Policy, material: str, now: float):
        """(value, stored_at) of the live entry of ``kind`` for the call, or None."""
        entry = self._read_entry(policy, material, now, kind)
        return None if entry is None else (_loads(entry[1]), entry[0])

    def _read_entry(self, policy: Policy, material: str, now: float, kind: str = RESPONSE, shared: bool = False):
        """(stored_at, payload) of the live entry of ``kind`` for the call, or None: from the L1 (a
        response; not with ``shared``) while it is younger than the soft TTL (else the TTL) and this
        process's view of the invalidation record does not hide it, else from the shared cache with
        the record, in one round trip (an older copy: another process may have stored a newer one)."""
        key = hashed_key(kind, policy, material)
        if kind == RESPONSE and not shared:
            local = self._local.get(key)
            if local is not None:
                _, stored_at, generation, payload, _ = local
                served_for = min(policy.cache_soft_ttl_s or policy.cache_ttl_s, policy.cache_ttl_s)
                if now - stored_at < served_for and not self._view(policy.name).hides(material, generation):
                    return stored_at, payload
                self._forget(key)
        found = self._get_many([key, record_key(policy.name)])
        if found is None:
            return None
        record = found.get(record_key(policy.name), NO_CLEARS)
        self._views[policy.name] = (record, self.monotonic())
        entry = found.get(key)
        if entry is None:
            return None
        stored_at, generation, payload = entry
        if record.hides(material, generation):
            return None
        if kind == RESPONSE:
            self._keep(key, policy, stored_at, generation, payload)
        return stored_at, payload

    def lookup(self, kind: str, policy: Policy, material: str, now: float, max_age: float | None):
        """(value, age_s) of the entry if stored and younger than max_age, else None."""
        found = self._read(kind, policy, material, now)
        if found is None:
            return None
        value, stored_at = found
        age = max(now - stored_at, 0.0)
        if max_age is not None and age >= max_age:
            return None
        return value, age

    def fresh(self, policy: Policy, material: str, now: float):
        return self.lookup(RESPONSE, policy, material, now, policy.cache_ttl_s)

    def stale(self, policy: Policy, material: str, now: float):
        return self.lookup(RESPONSE, policy, material, now, policy.cache_ttl_s + self.stale_s)

    def last_known(self, policy: Policy, material: str, now: float):
        return self.lookup(LAST_KNOWN, policy, material, now, None)

    # -- the cache step: serve, fill, or wait for the fill ---------------------------------

    def consult(self, policy: Policy, material: str, now: float, time_left: float) -> Lookup:
        """The cache step of a call with ``time_left`` seconds to its deadline."""
        found = self._read(RESPONSE, policy, material, now)
        stale = None
        if found is not None:
            age = now - found[1]
            if age < policy.cache_ttl_s:
                soft = policy.cache_soft_ttl_s
                refresh = soft is not None and age >= soft and self._mark_refresh(policy, material)
                return Lookup(policy, material, hit=found, refresh=refresh)
            if age < policy.cache_ttl_s + self.stale_s:
                stale = found
        claimed = self._claim(policy, material, time_left)
        if isinstance(claimed, Flight):  # another call of this process fills the key
            if stale is not None:
                return Lookup(policy, material, hit=stale)
            return Lookup(policy, material, waiting=claimed)
        if self._lock_fleet(claimed, time_left):
            return self._filled_meanwhile(claimed, now) or Lookup(policy, material, fill=claimed)
        if stale is not None:  # another process fills it: the stale entry serves meanwhile
            self._abandon(claimed)
            return Lookup(policy, material, hit=stale)
        return Lookup(policy, material, waiting=claimed)

    def _claim(self, policy: Policy, material: str, time_left: float) -> Fill | Flight:
        """This process's fill of the key, or the Flight of the call of the process that has it."""
        key = hashed_key(RESPONSE, policy, material)
        now = time.monotonic()
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None and not flight.done.is_set() and flight.expires > now:
                return flight
            flight = self._flights[key] = Flight(key, now + max(time_left, 0.0) + _FLIGHT_GRACE_S)
        return Fill(policy, material, key, flight)

    def _lock_fleet(self, fill: Fill, time_left: float) -> bool:
        """Take the fleet's fill lock of the key, for no longer than the filler's deadline."""
        token = unique_id()
        timeout = max(time_left, _FILL_MIN_S)
        backend = self.backend
        if not _counts_milliseconds(backend):
            timeout = math.ceil(timeout)  # backends that keep whole seconds: 0.3 would be "expire now"
        try:
            taken = backend.add(fill_key(fill.policy, fill.material), token, timeout)
        except Exception:  # noqa: BLE001 - without the shared cache each process fills on its own
            self._warn.warn("response cache %r unreachable; filling %s without the fleet's lock",
                            self.alias, fill.policy.name)
            return True
        if taken:
            fill.token = token
        return bool(taken)

    def _filled_meanwhile(self, fill: Fill, now: float, fresh_s: float | None = None) -> Lookup | None:
        """Once the fleet's lock is taken: the entry another process stored between this call's read and
        its lock (younger than ``fresh_s``, by default the TTL), served instead of a second upstream
        call (the lock is released), or None: this call fills the key."""
        entry = self._read_entry(fill.policy, fill.material, now, shared=True)
        if entry is None or now - entry[0] >= (fill.policy.cache_ttl_s if fresh_s is None else fresh_s):
            return None
        outcome = Lookup(fill.policy, fill.material, stored=entry)
        self._finish_flight(fill, outcome)
        return outcome.for_waiter()

    def wait(self, lookup: Lookup, time_left: Callable[[], float], now: Callable[[], float]) -> Lookup:
        """Wait for the fill ``lookup`` is waiting on: the final Lookup (hit, error, fill, or nothing
        when the call's deadline came first). ``time_left`` and ``now`` are the call's clock."""
        while True:
            pause = self._pause(lookup, time_left())
            if isinstance(pause, Lookup):
                return pause
            if isinstance(lookup.waiting, Flight):
                lookup.waiting.wait(pause)
            else:
                time.sleep(pause)
            lookup = self._after_wait(lookup, time_left(), now())

    async def await_(self, lookup: Lookup, time_left: Callable[[], float], now: Callable[[], float]) -> Lookup:
        """``wait``, awaited."""
        while True:
            pause = self._pause(lookup, time_left())
            if isinstance(pause, Lookup):
                return pause
            if isinstance(lookup.waiting, Flight):
                await lookup.waiting.await_(pause)
            else:
                await asyncio.sleep(pause)
            lookup = self._after_wait(lookup, time_left(), now())

    def _pause(self, lookup: Lookup, left: float) -> Lookup | float:
        """The final Lookup, or how long to wait (seconds) before looking again."""
        if lookup.waiting is None:
            return lookup
        if left <= 0:
            if isinstance(lookup.waiting, Fill):
                self._abandon(lookup.waiting)
            return Lookup(lookup.policy, lookup.material)
        if isinstance(lookup.waiting, Flight):
            return min(left, max(lookup.waiting.expires - time.monotonic(), 0.0) + 0.001)
        return min(_POLL_S, left)  # another process fills the key: look for its entry again soon

    def _after_wait(self, lookup: Lookup, left: float, now: float) -> Lookup:
        waiting, policy, material = lookup.waiting, lookup.policy, lookup.material
        if isinstance(waiting, Flight):
            if waiting.done.is_set() and waiting.outcome is not None:
                return waiting.outcome.for_waiter()
            if waiting.done.is_set() or waiting.expires <= time.monotonic():
                return self.consult(policy, material, now, left)  # the filler gave up: look again
            return lookup
        entry = self._read_entry(policy, material, now)
        if entry is not None and now - entry[0] < policy.cache_ttl_s:  # the other process's fill landed
            outcome = Lookup(policy, material, stored=entry)
            self._finish_flight(waiting, outcome)  # and this process's calls waiting get it too
            return outcome.for_waiter()
        if self._lock_fleet(waiting, left):  # the other filler is gone without an entry: fill it here
            return self._filled_meanwhile(waiting, now) or Lookup(policy, material, fill=waiting)
        return lookup

    # -- after the live call ---------------------------------------------------------------

    def settle(self, lookup: Lookup, stored: tuple | None = None, error=None) -> None:
        """The call is done with the cache step of ``lookup``: if it filled the key, what it stored
        (``store()``'s (stored_at, payload)) or else its error goes to the calls waiting (none of
        them: they look again); a wait it gave up is given up. Only the first settle of a fill counts."""
        fill = lookup.fill if lookup.fill is not None else lookup.waiting
        if not isinstance(fill, Fill) or fill.settled:
            return
        if lookup.fill is None:
            outcome = None
        elif stored is not None:
            outcome = Lookup(fill.policy, fill.material, stored=stored)
        elif error is not None:
            outcome = Lookup(fill.policy, fill.material, error=error)
        else:
            outcome = None
        self._finish_flight(fill, outcome)

    def _abandon(self, fill: Fill) -> None:
        self._finish_flight(fill, None)

    def _finish_flight(self, fill: Fill, outcome: Lookup | None) -> None:
        fill.settled = True
        with self._lock:
            if self._flights.get(fill.key) is fill.flight:
                del self._flights[fill.key]
            if outcome is not None and outcome.stored is not None:
                # a new entry: the next refresh is due at its soft TTL. A refresh that failed or was
                # given up keeps the mark until it expires (a call's timeout): not one refresh per hit.
                self._refreshing.pop(fill.key, None)
        fill.flight.resolve(outcome)
        if fill.token is not None:
            self._unlock_fleet(fill)

    def _unlock_fleet(self, fill: Fill) -> None:
        key, token, fill.token = fill_key(fill.policy, fill.material), fill.token, None
        backend = self.backend
        try:
            client = _redis_client(backend)
            if client is not None:  # only the lock this fill holds: it may have expired and been taken again
                client.eval(_UNLOCK, 1, backend.client.make_key(key), backend.client.encode(token))
            elif backend.get(key) == token:
                backend.delete(key)
        except Exception:  # noqa: BLE001 - an unreleased lock expires by itself at the filler's deadline
            self._warn.warn("response cache %r: the fill lock of %s not released", self.alias, fill.policy.name)

    def store(self, policy: Policy, material: str, value: Any, now: float, *, response: bool,
              last_known: bool) -> tuple[float, bytes] | None:
        """Store a live value; (stored_at, payload) when it was stored (a value that cannot be pickled
        is not: None), what ``settle`` hands to the calls waiting for it."""
        if not (response or last_known):
            return None
        try:
            payload = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            logger.warning("result of %s not cached: it cannot be pickled (%s)", policy.name, exc)
            return None
        generation = self._view(policy.name).generation
        entry = (now, generation, payload)
        entries = {}
        if response:
            entries[hashed_key(RESPONSE, policy, material)] = entry
            self._keep(hashed_key(RESPONSE, policy, material), policy, now, generation, payload)
        if last_known:
            entries[hashed_key(LAST_KNOWN, policy, material)] = entry
        timeout = self.last_known_ttl_s if last_known else policy.cache_ttl_s + self.stale_s
        try:
            # one round trip; the response entry outlives its TTL, which fresh() checks by age
            self.backend.set_many(entries, timeout)
        except Exception:  # noqa: BLE001 - a cache write that fails must not fail the call that succeeded
            self._warn.warn("response cache %r unwritable; result of %s not cached", self.alias, policy.name)
        return now, payload

    # -- background refresh ----------------------------------------------------------------

    def _mark_refresh(self, policy: Policy, material: str) -> bool:
        """True once per key while its refresh runs in this process (until it stores a value, else
        until the call's timeout)."""
        key = hashed_key(RESPONSE, policy, material)
        now = time.monotonic()
        with self._lock:
            if self._refreshing.get(key, 0.0) > now:
                return False
            self._refreshing[key] = now + policy.timeout_ms / 1000
        return True

    def claim_refresh(self, policy: Policy, material: str, now: float) -> Fill | None:
        """The fill of a background refresh, or None when it is not needed (refreshed elsewhere) or
        another call fills the key."""
        # the shared entry, not this process's copy: another process may have refreshed it already
        entry = self._read_entry(policy, material, now, shared=True)
        soft = policy.cache_soft_ttl_s
        if entry is not None and soft is not None and now - entry[0] < soft:
            return None
        fill = self._claim(policy, material, policy.timeout_ms / 1000)
        if isinstance(fill, Flight):
            return None
        if not self._lock_fleet(fill, policy.timeout_ms / 1000):
            self._abandon(fill)  # another process refreshes it; this process's mark stays until it expires
            return None
        if soft is not None and self._filled_meanwhile(fill, now, soft) is not None:
            return None  # refreshed by another process between the read above and the lock
        return fill

    def in_background(self, task: Callable[[], None]) -> None:
        """Run ``task`` in this process's refresh threads (a forked child starts its own)."""
        if self._executor_pid != os.getpid():
            with self._lock:
                if self._executor_pid != os.getpid():
                    self._executor = ThreadPoolExecutor(self.refresh_workers, thread_name_prefix="cache-refresh")
                    self._executor_pid = os.getpid()
        self._executor.submit(task)

    # -- clearing --------------------------------------------------------------------------

    def clear(self, name: str, *, key: Any = MISSING, prefix: str | None = None, policy: Policy | None = None) -> int:
        """Hide the integration's entries in every process sharing the cache: all of them, those of
        one cache key, or those whose string cache key starts with ``prefix``. The new generation."""
        if key is not MISSING and prefix is not None:
            raise ValueError("clear a key or a prefix, not both")
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string (string cache keys are cleared by prefix), got {prefix!r}")
        if key is not MISSING:
            scope, text = KEY, key_material(None, (), {}, key)
        elif prefix is not None:
            scope, text = PREFIX, prefix_material(prefix)
        else:
            scope, text = ALL, ""
        try:
            record = self._rewrite_record(name, scope, text)
        except CacheUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure: the operator is told, nothing is cleared
            raise CacheUnavailable(f"the response cache {self.alias!r} could not record the clear of {name}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        self._views[name] = (record, self.monotonic())
        with self._lock:
            for local_key in [k for k, v in self._local.items() if v[0] == name]:
                del self._local[local_key]
        if scope == KEY and policy is not None:
            try:
                self.backend.delete_many([hashed_key(RESPONSE, policy, text), hashed_key(LAST_KNOWN, policy, text)])
            except Exception:  # noqa: BLE001 - the record hides them anyway
                self._warn.warn("response cache %r: entries of %s not deleted", self.alias, name)
        return record.generation

    def _rewrite_record(self, name: str, scope: str, text: str) -> Invalidations:
        """Add a clear to the record under a short lock (clears are rare; readers never take it)."""
        backend, lock = self.backend, f"{record_key(name)}:lock"
        token, give_up = unique_id(), time.monotonic() + 10
        while not backend.add(lock, token, 5):
            if time.monotonic() > give_up:
                raise CacheUnavailable(f"the cache record of {name} stayed locked for 10 s; nothing was cleared")
            time.sleep(0.01)
        try:
            record = backend.get(record_key(name), NO_CLEARS)
            now, generation = time.time(), record.generation + 1
            keep_since = now - self.last_known_ttl_s - self.stale_s  # no entry is older than this
            clears = [clear for clear in record.clears if clear.at >= keep_since] if scope != ALL else []
            if len(clears) >= MAX_CLEARS:  # hide more rather than forget a clear
                clears = [Clear(clears[-MAX_CLEARS // 2].generation, ALL, "", clears[-MAX_CLEARS // 2].at),
                          *clears[-MAX_CLEARS // 2 + 1:]]
            record = Invalidations(generation, (*clears, Clear(generation, scope, text, now)))
            backend.set(record_key(name), record, None)
            return record
        finally:
            if backend.get(lock) == token:
                backend.delete(lock)

    # -- figures ---------------------------------------------------------------------------

    def local_stats(self, name: str, now: float) -> dict:
        """This process's L1 entries of the integration and their average age."""
        with self._lock:
            ages = [now - entry[1] for entry in self._local.values() if entry[0] == name and entry[4] > now]
        return {"entries": len(ages), "average_age_s": sum(ages) / len(ages) if ages else None}

    def _keep(self, key: str, policy: Policy, stored_at: float, generation: int, payload: bytes) -> None:
        if self.local_entries <= 0:
            return
        expires = stored_at + policy.cache_ttl_s + self.stale_s
        with self._lock:
            self._local[key] = (policy.name, stored_at, generation, payload, expires)
            self._local.move_to_end(key)
            while len(self._local) > self.local_entries:
                self._local.popitem(last=False)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._local.pop(key, None)


_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _loads(payload: bytes):
    return pickle.loads(payload)


def _redis_client(backend):
    """django-redis's client of the cache (for the one script the fill lock needs), or None."""
    client = getattr(backend, "client", None)
    get_client = getattr(client, "get_client", None)
    return get_client(write=True) if get_client is not None else None


def _counts_milliseconds(backend) -> bool:
    """Whether the backend keeps a float timeout (django-redis: PX; local memory: a float expiry)."""
    from django.core.cache.backends.locmem import LocMemCache

    return _redis_client(backend) is not None or isinstance(backend, LocMemCache)
