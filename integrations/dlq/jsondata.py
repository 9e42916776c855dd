"""JSON data for the dead letter queue: strict for payloads, lenient for error details.

A payload must survive the trip to the database and back unchanged, so
anything JSON cannot hold is refused (``json_payload``). Error details are a
record of what happened, so what JSON cannot hold is kept as its repr
(``json_safe``) rather than losing the dead letter over it.
"""

from __future__ import annotations

import math
from typing import Any

MAX_SAFE_DEPTH = 32


def json_payload(value: Any) -> Any:
    """A copy of ``value`` as plain JSON data (tuples become lists), or raise naming the offending part.

    TypeError for a value JSON cannot hold (a datetime, a set, a model
    instance, a non-string key); ValueError for NaN, infinities, cycles and NUL
    characters (valid JSON, but PostgreSQL cannot store them).
    """
    return _to_json(value, "payload", set())


def _to_json(value: Any, path: str, parents: set[int]) -> Any:
    if isinstance(value, str):
        return _text(value, path)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"dead letter {path} is {value!r}: JSON has no NaN or infinity")
        return value
    if isinstance(value, (dict, list, tuple)):
        if id(value) in parents:
            raise ValueError(f"dead letter {path} refers back to itself: JSON cannot hold a cycle")
        parents.add(id(value))
        try:
            if isinstance(value, dict):
                copy = {}
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise TypeError(f"dead letter {path} has the key {key!r} ({type(key).__name__}): "
                                        f"JSON object keys are strings")
                    copy[_text(key, f"{path} key {key!r}")] = _to_json(item, f"{path}[{key!r}]", parents)
                return copy
            return [_to_json(item, f"{path}[{index}]", parents) for index, item in enumerate(value)]
        finally:
            parents.discard(id(value))
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise TypeError(f"dead letter {path} is a {kind}, which is not JSON: pass plain data "
                    f"(dict, list, str, int, float, bool, None), e.g. an id or an ISO date string")


def _text(value: str, path: str) -> str:
    # Valid JSON, but PostgreSQL's jsonb refuses it: better refused here, on every database.
    if "\x00" in value:
        raise ValueError(f"dead letter {path} contains a NUL character, which PostgreSQL cannot store")
    return value


def json_safe(value: Any, _depth: int = 0) -> Any:
    """A copy of ``value`` that JSON can hold: other values become their repr, non-finite floats strings.

    Nesting deeper than MAX_SAFE_DEPTH is cut to a repr, which also ends cycles.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if _depth >= MAX_SAFE_DEPTH:
        return repr(value)[:200]
    if isinstance(value, dict):
        return {json_safe(key) if isinstance(key, str) else repr(key): json_safe(item, _depth + 1)
                for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(item, _depth + 1) for item in value]
    return repr(value)
