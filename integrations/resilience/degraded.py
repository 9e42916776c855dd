"""Degraded mode: with ``capacity`` below 1, only that share of calls proceeds.

Shedding is deterministic rather than random: each call earns ``capacity`` of
a credit and a call proceeds when a whole credit is available, so over any
run of N calls the share let through is within one call of N x capacity.
"""

from __future__ import annotations

import threading


class Shedder:
    __slots__ = ("_credit", "_lock")

    def __init__(self) -> None:
        self._credit = 0.0
        self._lock = threading.Lock()

    def admit(self, capacity: float) -> bool:
        if capacity >= 1.0:
            return True
        with self._lock:
            self._credit += capacity
            if self._credit >= 1.0:
                self._credit -= 1.0
                return True
            return False
