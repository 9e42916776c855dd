"""Clearing and warming the response cache from outside a call: the admin's "Clear cache", the API's
DELETE /api/cache/{name}/?key=|prefix=, and ``manage.py resilience cache {warm,clear}``.

Each clear goes through the cache's invalidation record, so another process's L1 stops serving
the cleared entries once its view of the record is older than ``view_s``: here "another process"
is a second ResponseCache on the same cache backend (local memory in the embedded run, the site's
Redis with REDIS_URL), driven on its own clock so no test waits.
"""

import json
import time

import pytest
from django.core.management import CommandError, call_command

from api_support import client_for, error_of, no_rate_limits  # noqa: F401 - autouse fixture
from integrations.models import Integration
from integrations.resilience import execute
from integrations.resilience.cache import ResponseCache

pytestmark = pytest.mark.django_db

KEYS = ("quotes/EUR", "quotes/USD", "rates/EUR")


@pytest.fixture
def prices():
    return Integration.objects.create(name="prices", kind="market_data", cache_ttl_s=300, max_retries=0,
                                      timeout_enforcement="inline")


class OtherProcess:
    """A second cache on the same backend with its own L1, on a clock the test moves."""

    def __init__(self, integration):
        self.policy = integration.to_policy()  # the policy as it was: this process has not reloaded it
        self.seconds = 1000.0
        self.cache = ResponseCache(monotonic=lambda: self.seconds)

    def serves(self, key):
        lookup = self.cache.consult(self.policy, json.dumps(key), time.time(), 1.0)
        self.cache.settle(lookup)
        return lookup.hit[0] if lookup.hit else None

    def later(self):
        self.seconds += self.cache.view_s  # its view of the invalidation record is due to be read again
        return self


def fill(integration, value="old"):
    for key in KEYS:
        assert execute(integration.name, lambda: value, cache_key=key).source == "live"
    other = OtherProcess(integration)
    assert [other.serves(key) for key in KEYS] == [value] * 3  # read from the shared cache, now in its L1
    return other


def sources(integration):
    return [execute(integration.name, lambda: "new", cache_key=key).source for key in KEYS]


# -- the API ---------------------------------------------------------------------------------------

@pytest.fixture
def operator():
    return client_for("operator", perms=("change_integration",))


def test_the_api_clears_one_key_and_another_process_stops_serving_it(operator, prices):
    other = fill(prices)
    response = operator.delete("/api/cache/prices/?key=quotes/EUR")
    assert response.status_code == 200, response.content
    assert {k: response.json()[k] for k in ("scope", "version")} == {"scope": "key", "version": 0}
    assert [other.serves(key) for key in KEYS] == ["old"] * 3  # its view is not due yet: the bound, not a wait
    assert [other.later().serves(key) for key in KEYS] == [None, "old", "old"]
    assert sources(prices) == ["live", "cache", "cache"]


def test_the_api_clears_a_prefix_in_every_process(operator, prices):
    other = fill(prices)
    assert operator.delete("/api/cache/prices/?prefix=quotes/").json()["scope"] == "prefix"
    assert [other.later().serves(key) for key in KEYS] == [None, None, "old"]
    assert sources(prices) == ["live", "live", "cache"]


def test_the_api_clears_everything_in_every_process_even_one_on_the_old_version(
        operator, prices, django_capture_on_commit_callbacks):
    other = fill(prices)
    with django_capture_on_commit_callbacks(execute=True):
        body = operator.delete("/api/cache/prices/").json()
    assert (body["scope"], body["version"]) == ("all", 1)
    assert [other.later().serves(key) for key in KEYS] == [None] * 3  # the record hides them, whatever the version
    assert sources(prices) == ["live"] * 3


@pytest.mark.parametrize("query, field", [("key=a&prefix=b", "prefix"), ("prefix=", "prefix")])
def test_bad_clear_parameters_are_refused_naming_the_field_and_nothing_is_cleared(operator, prices, query, field):
    other = fill(prices)
    error = error_of(operator.delete(f"/api/cache/prices/?{query}"), 400)
    assert field in json.dumps(error)
    assert sources(prices) == ["cache"] * 3
    assert [other.later().serves(key) for key in KEYS] == ["old"] * 3


# -- the admin -------------------------------------------------------------------------------------

def test_the_admin_action_clears_every_process(admin_client, prices, django_capture_on_commit_callbacks):
    other = fill(prices)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post("/admin/integrations/integration/",
                                     {"action": "clear_caches", "_selected_action": [prices.pk]}, follow=True)
    assert "Cache cleared: prices" in response.content.decode()
    assert [other.later().serves(key) for key in KEYS] == [None] * 3
    assert sources(prices) == ["live"] * 3


# -- manage.py resilience cache clear --------------------------------------------------------------

def run(*args):
    from io import StringIO

    out = StringIO()
    call_command("resilience", "cache", *args, stdout=out)
    return out.getvalue()


@pytest.mark.parametrize("args, expected", [
    (("--key", "quotes/EUR"), [None, "old", "old"]),
    (("--prefix", "quotes/"), [None, None, "old"]),
    ((), [None, None, None]),
])
def test_the_clear_command_reaches_another_process(prices, args, expected, django_capture_on_commit_callbacks):
    other = fill(prices)
    with django_capture_on_commit_callbacks(execute=True):
        assert "prices: cleared" in run("clear", "prices", *args)
    assert [other.later().serves(key) for key in KEYS] == expected


@pytest.mark.parametrize("args, message", [
    (("clear", "nope"), 'Unknown integration "nope"'),
    (("clear", "prices", "--key", "a", "--prefix", "b"), "--prefix: not allowed with argument --key"),
    (("clear", "prices", "--prefix", ""), "--prefix: an empty prefix"),
])
def test_bad_clear_arguments_fail_naming_them_and_clear_nothing(prices, args, message):
    other = fill(prices)
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert sources(prices) == ["cache"] * 3
    assert [other.later().serves(key) for key in KEYS] == ["old"] * 3


# -- manage.py resilience cache warm ---------------------------------------------------------------

def fetch(key):
    if key == "quotes/BAD":
        raise ConnectionError("upstream refused quotes/BAD")
    return f"warm:{key}"


FUNCTION = f"{__name__}.fetch"


def keys_file(tmp_path, *lines):
    path = tmp_path / "keys.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_warming_fills_each_key_through_the_pipeline_for_every_process(prices, tmp_path):
    path = keys_file(tmp_path, "# the quotes", '"quotes/EUR"', "", '"quotes/USD"')
    assert "prices: warmed 2 of 2 keys." in run("warm", "prices", "--keys-from", path, "--function", FUNCTION)
    served = [execute("prices", lambda: "live", cache_key=key) for key in ("quotes/EUR", "quotes/USD")]
    assert [(r.value, r.source) for r in served] == [("warm:quotes/EUR", "cache"), ("warm:quotes/USD", "cache")]
    assert OtherProcess(prices).serves("quotes/USD") == "warm:quotes/USD"  # in the shared cache too


def test_warming_replaces_an_entry_already_cached(prices, tmp_path):
    execute("prices", lambda: "old", cache_key="quotes/EUR")
    run("warm", "prices", "--keys-from", keys_file(tmp_path, '"quotes/EUR"'), "--function", FUNCTION)
    assert execute("prices", lambda: "live", cache_key="quotes/EUR").value == "warm:quotes/EUR"


def test_a_key_whose_call_fails_is_named_and_the_others_are_warmed(prices, tmp_path):
    path = keys_file(tmp_path, '"quotes/EUR"', '"quotes/BAD"', '"quotes/USD"')
    with pytest.raises(CommandError, match=r'1 keys not warmed: "quotes/BAD": network .*quotes/BAD'):
        run("warm", "prices", "--keys-from", path, "--function", FUNCTION)
    assert [execute("prices", lambda: "live", cache_key=key).value for key in ("quotes/EUR", "quotes/USD")] == [
        "warm:quotes/EUR", "warm:quotes/USD"]


@pytest.mark.parametrize("lines, function, message", [
    (['"quotes/EUR"'], "no_such_module_xyz.fetch", "--function: cannot import no_such_module_xyz"),
    (['"quotes/EUR"'], f"{__name__}.nothing", "--function: .* has no function 'nothing'"),
    (['"quotes/EUR"'], "fetch", "--function: 'fetch' is not a dotted path"),
    (['"quotes/EUR"', "quotes/USD"], FUNCTION, "--keys-from: .*, line 2: not a JSON value"),
    (["# nothing"], FUNCTION, "--keys-from: .* has no keys"),
])
def test_bad_warm_arguments_fail_naming_them_before_any_call(prices, tmp_path, lines, function, message):
    with pytest.raises(CommandError, match=message):
        run("warm", "prices", "--keys-from", keys_file(tmp_path, *lines), "--function", function)
    assert execute("prices", lambda: "live", cache_key="quotes/EUR").source == "live"  # nothing warmed


def test_warming_an_unreadable_file_an_unknown_integration_or_an_uncached_one_is_refused(prices, tmp_path):
    with pytest.raises(CommandError, match=r"--keys-from: cannot read .*missing.jsonl"):
        run("warm", "prices", "--keys-from", str(tmp_path / "missing.jsonl"), "--function", FUNCTION)
    path = keys_file(tmp_path, '"quotes/EUR"')
    with pytest.raises(CommandError, match='Unknown integration "nope"'):
        run("warm", "nope", "--keys-from", path, "--function", FUNCTION)
    Integration.objects.create(name="ledger", kind="database", cache_ttl_s=0)
    with pytest.raises(CommandError, match="ledger: cache_ttl_s is 0"):
        run("warm", "ledger", "--keys-from", path, "--function", FUNCTION)
    with pytest.raises(CommandError, match="the following arguments are required: --keys-from"):
        run("warm", "prices", "--function", FUNCTION)


# -- a shared cache that is down -------------------------------------------------------------------

@pytest.fixture
def cache_down(settings, monkeypatch):
    """The engine's response cache on a Redis address nothing listens on (a real client, no server)."""
    from integrations.resilience import get_engine

    settings.CACHES = {**settings.CACHES, "down": {
        "BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:1/0",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2}}}
    monkeypatch.setattr(get_engine().cache, "alias", "down")


def test_a_clear_the_cache_cannot_record_is_an_error_everywhere_and_changes_nothing(prices, operator, admin_client,
                                                                                     cache_down):
    error = error_of(operator.delete("/api/cache/prices/"), 503)
    assert error["code"] == "cache_unavailable"
    assert "could not record the clear of prices" in error["message"] and "Nothing was cleared" in error["message"]
    with pytest.raises(CommandError, match="could not record the clear of prices.*Nothing was cleared"):
        run("clear", "prices", "--prefix", "quotes/")
    response = admin_client.post("/admin/integrations/integration/",
                                 {"action": "clear_caches", "_selected_action": [prices.pk]}, follow=True)
    assert "Cache not cleared: the response cache &#x27;down&#x27; could not record" in response.content.decode()
    prices.refresh_from_db()
    assert prices.cache_version == 0  # the version did not move either
