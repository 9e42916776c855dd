"""Secrets out of what the dead letter queue stores: error details and headers.

A key is secret when, lower-cased with '-' read as '_', it contains one of
SECRET_KEY_PARTS: ``Authorization``, ``X-Api-Key``, ``client_secret``,
``refresh_token``, ``db_password``, ``Cookie``... Values under such keys are
replaced at any depth, and ``name=value`` pairs with such a name inside text
(a URL's query string in an error message) lose their value. Payloads are not
redacted: a redrive needs them whole.
"""

from __future__ import annotations

import re
from typing import Any

SECRET_KEY_PARTS = ("password", "passwd", "token", "secret", "authorization", "api_key", "apikey", "cookie")
REDACTED = "[redacted]"

_SECRET_PAIR = re.compile(
    r"(?i)\b([\w-]*(?:" + "|".join(part.replace("_", "[_-]") for part in SECRET_KEY_PARTS) + r")[\w-]*=)[^&\s#\"']+"
)


def is_secret_key(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    folded = key.lower().replace("-", "_")
    return any(part in folded for part in SECRET_KEY_PARTS)


def redact_text(text: str) -> str:
    """``...?api_key=abc&page=2`` -> ``...?api_key=[redacted]&page=2``."""
    return _SECRET_PAIR.sub(lambda match: match.group(1) + REDACTED, text)


def redact_secrets(value: Any) -> Any:
    """A copy of ``value`` with secrets replaced, in nested dicts and lists too.

    Header lists of (name, value) pairs, as httpx gives them, are redacted by name.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: REDACTED if is_secret_key(key) else redact_secrets(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                         for item in value):
            return [[name, REDACTED if is_secret_key(name) else redact_secrets(item)] for name, item in value]
        return [redact_secrets(item) for item in value]
    return value
