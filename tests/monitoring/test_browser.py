"""The System health page in a real browser: Debian's headless Chromium, driven by Selenium, against the live server.

The page must render its cards under the site's Content-Security-Policy (its script and styles are static
files), draw its charts, and show an operator's action from the Integration list after its own refresh,
without a full page reload. A screenshot is kept in artifacts/system-health.png.

Selenium Manager never runs: the driver and the browser are Debian's, named explicitly. Without them the test
skips, except under .ci/run (RESILIENCE_TESTS_REQUIRE_CHROMIUM=1), which installs them: there it fails.
"""

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from browser_support import PASSWORD, log_in
from integrations.models import BreakerEvent, Integration
from integrations.resilience import execute
from monitoring import health_page
from monitoring.models import CRITICAL, Alert, CallStats

SCREENSHOT = Path(__file__).resolve().parents[2] / "artifacts" / "system-health.png"

pytestmark = pytest.mark.slow


@pytest.fixture
def console(live_server, django_user_model, monkeypatch):
    """Two integrations with an hour of traffic (search's breaker open), a critical alert, an operator."""
    django_user_model.objects.create_superuser("operator", "operator@example.com", PASSWORD)
    billing = Integration.objects.create(name="billing", hourly_limit=100, daily_limit=2000)
    search = Integration.objects.create(name="search", failure_threshold=1, max_retries=0,
                                        timeout_enforcement="inline")
    now = timezone.now().replace(second=0, microsecond=0)
    for minute in range(60):
        calls = 20 + (minute * 7) % 30
        CallStats.objects.create(integration=billing, minute=now - timedelta(minutes=minute), calls=calls,
                                 successes=calls - 1, failures_timeout=1, latency_le_50=calls - 2, latency_le_250=2,
                                 cache_hits=minute % 5, cache_misses=2)
    for _ in range(30):
        execute("billing", lambda: "ok")
    execute("search", lambda: (_ for _ in ()).throw(ConnectionError("search is down")))
    Alert.raise_or_update(Alert.UNAVAILABLE, CRITICAL, "unavailable: breaker open for 6 min", integration=search)
    return live_server.url, billing


def card_state(browser, name):
    # read in one script: the page may draw its cards anew between two WebDriver calls
    return browser.execute_script(
        "const card = document.querySelector(`article[data-integration='${arguments[0]}']`);"
        "return card && card.dataset.state;", name)


def refresh_now(browser, wait, seconds):
    """Press "Refresh now" and wait for the document saying the page refreshes every ``seconds``."""
    browser.find_element(By.ID, "health-refresh").click()
    wait.until(lambda driver: driver.execute_script(
        "return document.getElementById('health-refresh-seconds').textContent;") == str(seconds))


def test_the_system_health_page_draws_itself_and_shows_an_operators_action_after_its_refresh(browser, console,
                                                                                             monkeypatch):
    base_url, billing = console
    log_in(browser, base_url, "/admin/monitoring/systemhealth/")
    wait = WebDriverWait(browser, 15)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, 'article[data-integration="search"]')))

    # the cards, with their breakers, and the critical banner
    assert browser.title.startswith("System health")
    assert card_state(browser, "billing") == "closed"
    assert card_state(browser, "search") == "open"
    banner = browser.find_element(By.ID, "health-banner")
    assert banner.is_displayed() and "unavailable: breaker open for 6 min" in banner.text
    assert browser.find_element(By.ID, "health-status").text.lower() == "overall: critical"
    billing_card = browser.find_element(By.CSS_SELECTOR, 'article[data-integration="billing"]')
    assert "hourly: 30 / 100" in billing_card.text
    assert billing_card.find_element(By.CSS_SELECTOR, ".health-bar-fill").size["width"] > 0

    # the chart: a line through 60 points, not flat, really laid out by the browser
    chart = browser.execute_script("""
        const line = document.querySelector('article[data-integration="billing"] path.health-chart-line');
        const d = line.getAttribute("d");
        const ys = new Set(d.split(/[ML]/).filter(Boolean).map((point) => point.split(",")[1]));
        return {segments: (d.match(/L/g) || []).length, distinctY: ys.size, length: line.getTotalLength(),
                width: line.ownerSVGElement.getBoundingClientRect().width};
    """)
    assert chart["segments"] == 59 and chart["distinctY"] > 5
    assert chart["length"] > 100 and chart["width"] > 100

    # the page's own timer, sped up: the next document says 1 s, and the page follows it
    monkeypatch.setattr(health_page, "REFRESH_SECONDS", 1)
    refresh_now(browser, wait, 1)

    # an action in another tab: force billing's breaker open from the Integration list
    browser.execute_script("window.notReloaded = true;")
    health_tab = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get(f"{base_url}/admin/integrations/integration/")
    browser.find_element(By.CSS_SELECTOR, f'input[name="_selected_action"][value="{billing.pk}"]').click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("force_open")
    browser.find_element(By.CSS_SELECTOR, 'button[name="index"]').click()
    messages = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "ul.messagelist")))
    assert "Breaker forced open: billing" in messages.text
    browser.close()
    browser.switch_to.window(health_tab)

    # the page's own refresh shows it, without reloading the page
    wait.until(lambda driver: card_state(driver, "billing") == "open")
    assert browser.execute_script("return window.notReloaded === true;")
    assert int(browser.find_element(By.ID, "system-health").get_attribute("data-refreshes")) >= 2
    assert BreakerEvent.objects.filter(integration=billing, by="operator", to_state="open").exists()

    # the page ran under the site's Content-Security-Policy without a complaint
    problems = [entry for entry in browser.get_log("browser")
                if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]]
    assert problems == []

    # back to the usual 30 s, so the page holds still for the screenshot
    monkeypatch.setattr(health_page, "REFRESH_SECONDS", 30)
    refresh_now(browser, wait, 30)
    # read in one script (a refresh of the 1 s timer may still redraw the card in between)
    assert "open (forced open)" in browser.execute_script(
        "return document.querySelector('article[data-integration=\"billing\"] [data-role=\"state\"]').textContent;")

    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000


def test_the_system_health_page_shows_the_user_defined_rules(browser, live_server, django_user_model, monkeypatch):
    """Each rule's name, current value, levels and state, drawn by health.js; an erroring rule shows its error."""
    import rules_support
    from monitoring import rules

    monkeypatch.setattr(rules, "_metrics", {})
    monkeypatch.setattr(rules, "_rules", {})
    monkeypatch.setitem(rules_support.VALUES, "site", 62.5)
    django_user_model.objects.create_superuser("operator", "operator@example.com", PASSWORD)
    rules.register_metric("fraud_rate", rules_support.site_value, unit="%")
    rules.register_rule("fraud_rate_high", metric="fraud_rate", warning=50, critical=70)
    rules.register_rule("payments_broken", metric=rules_support.broken, warning=1)
    log_in(browser, live_server.url, "/admin/monitoring/systemhealth/")
    wait = WebDriverWait(browser, 15)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '#health-rules [data-rule="payments_broken"]')))
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('#health-rules tbody tr'))"
        ".map((row) => Array.from(row.cells).map((cell) => cell.textContent));")
    assert rows == [["fraud_rate_high", "62.5%", "above warning 50%, critical 70%", "warning"],
                    ["payments_broken", "ZeroDivisionError: no payments table yet", "above warning 1", "error"]]
