"""The registry of dead letter handlers: the functions a redrive calls again.

    @dead_letter_handler("billing.charge")
    def charge(payload):                       # the stored JSON payload
        ...

    @dead_letter_handler("billing.refund", takes_context=True)
    def refund(payload, context):              # context: a RedriveContext
        billing.refund(payload["order"], idempotency_key=context.idempotency_key)

A handler is registered when its module is imported. Every process that
redrives (the django-q cluster, ``manage.py dlq retry``) imports, at start-up,
the ``dead_letters`` module of each installed app and the modules listed in
``RESILIENCE_DLQ_HANDLER_MODULES``; put handlers there.

A handler may run more than once for one entry (a worker killed after the
handler's effect but before its outcome was stored), never twice at once:
make its effect idempotent with ``context.idempotency_key``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from django.core.exceptions import ImproperlyConfigured

from integrations.resilience.fallback import is_async_callable


class UnknownHandler(ImproperlyConfigured):
    """No handler is registered under that name in this process."""


@dataclass(frozen=True, slots=True)
class Handler:
    name: str
    fn: Callable
    takes_context: bool

    def arguments(self, payload, context: "RedriveContext") -> tuple:
        """The positional arguments the handler is called with."""
        return (payload, context) if self.takes_context else (payload,)


@dataclass(frozen=True, slots=True)
class RedriveContext:
    """What a handler declared with ``takes_context=True`` receives besides its payload."""

    entry_id: int
    integration: str
    handler: str
    idempotency_key: str  # the entry's key, or "dead-letter-<id>": stable across the entry's redrives
    attempt: int  # 1 for the first redrive of the entry
    max_redrives: int


_HANDLERS: dict[str, Handler] = {}


def dead_letter_handler(name: str, *, takes_context: bool = False) -> Callable[[Callable], Callable]:
    """Register the decorated function as the dead letter handler called ``name``; returns it unchanged."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a dead letter handler needs a non-empty name, got {name!r}")

    def register(fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"dead letter handler {name!r} must be callable, got {fn!r}")
        if is_async_callable(fn):
            raise TypeError(f"dead letter handler {name!r} is a coroutine function: redrives call handlers "
                            f"synchronously; register a sync function (asgiref's async_to_sync can wrap it)")
        current = _HANDLERS.get(name)
        # A module imported again (autoreload, importlib.reload) re-registers its own function: allowed.
        if current is not None and _origin(current.fn) != _origin(fn):
            raise ImproperlyConfigured(
                f"dead letter handler {name!r} is already registered by {_origin(current.fn)}; "
                f"{_origin(fn)} cannot take the name too"
            )
        _HANDLERS[name] = Handler(name, fn, takes_context)
        return fn

    return register


def _origin(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def get_handler(name: str) -> Handler:
    try:
        return _HANDLERS[name]
    except KeyError:
        known = ", ".join(sorted(_HANDLERS)) or "none"
        raise UnknownHandler(
            f"Unknown dead letter handler {name!r} (registered: {known}). Register it with "
            f"@dead_letter_handler({name!r}) in an app's dead_letters module or in a module "
            f"listed in RESILIENCE_DLQ_HANDLER_MODULES."
        ) from None


def registered_handlers() -> list[str]:
    return sorted(_HANDLERS)


def autodiscover() -> None:
    """Import every app's ``dead_letters`` module and the modules of RESILIENCE_DLQ_HANDLER_MODULES."""
    from django.utils.module_loading import autodiscover_modules

    from .conf import dlq_settings

    autodiscover_modules("dead_letters")
    for module in dlq_settings.HANDLER_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"RESILIENCE_DLQ_HANDLER_MODULES names {module!r}, which cannot be imported: {exc}"
            ) from exc
