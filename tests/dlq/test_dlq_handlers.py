"""The handler registry: names, duplicates, how handlers are called, and where they are discovered."""

import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from integrations.dlq import handlers
from integrations.dlq.handlers import RedriveContext, autodiscover, dead_letter_handler, get_handler


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(handlers, "_HANDLERS", {})
    return handlers


def charge(payload):
    return payload


def refund(payload, context):
    return payload, context


def test_a_handler_is_called_with_its_payload_and_with_takes_context_the_context_too(registry):
    dead_letter_handler("billing.charge")(charge)
    dead_letter_handler("billing.refund", takes_context=True)(refund)
    context = RedriveContext(entry_id=1, integration="billing", handler="billing.refund", idempotency_key="k",
                             attempt=1, max_redrives=5)
    assert get_handler("billing.charge").arguments({"order": 7}, context) == ({"order": 7},)
    assert get_handler("billing.refund").arguments({"order": 7}, context) == ({"order": 7}, context)


def test_a_name_taken_by_another_function_is_refused_naming_both(registry):
    dead_letter_handler("billing.charge")(charge)
    with pytest.raises(ImproperlyConfigured, match="already registered by test_dlq_handlers.charge; "
                                                   "test_dlq_handlers.refund cannot take the name too"):
        dead_letter_handler("billing.charge")(refund)


def test_the_same_function_registering_again_is_allowed(registry):
    dead_letter_handler("billing.charge")(charge)
    assert dead_letter_handler("billing.charge")(charge) is charge


def test_a_coroutine_function_is_refused_at_registration(registry):
    async def charge_async(payload):
        return payload

    with pytest.raises(TypeError, match="'billing.charge' is a coroutine function"):
        dead_letter_handler("billing.charge")(charge_async)


def test_a_handler_needs_a_name():
    with pytest.raises(ValueError, match="non-empty name"):
        dead_letter_handler(" ")


def test_autodiscovery_imports_the_modules_of_the_setting(registry, settings, tmp_path, monkeypatch):
    (tmp_path / "shop_dead_letters.py").write_text(
        "from integrations.dlq import dead_letter_handler\n"
        "@dead_letter_handler('shop.ship')\n"
        "def ship(payload):\n"
        "    return payload\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "shop_dead_letters", raising=False)
    settings.RESILIENCE_DLQ_HANDLER_MODULES = ["shop_dead_letters"]
    autodiscover()
    assert registry.registered_handlers() == ["shop.ship"]


def test_a_module_of_the_setting_that_cannot_be_imported_is_named(registry, settings):
    settings.RESILIENCE_DLQ_HANDLER_MODULES = ["shop_no_such_module"]
    with pytest.raises(ImproperlyConfigured, match="RESILIENCE_DLQ_HANDLER_MODULES names 'shop_no_such_module'"):
        autodiscover()
