"""Counts the requests this process writes to Redis (a pipeline is one), for the benchmarks' "round trips"."""

from __future__ import annotations

from redis.connection import Connection


class _Counter:
    writes = 0


counter = _Counter()
_send = Connection.send_packed_command


def _counting_send(self, command, check_health=True):
    counter.writes += 1
    return _send(self, command, check_health)


Connection.send_packed_command = _counting_send
