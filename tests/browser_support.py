"""Headless Chromium for the browser tests: Debian's chromium and chromedriver, nothing downloaded.

The ``browser`` fixture (conftest.py) starts one; ``log_in`` signs the
operator in through the admin's login form.
"""

import os

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PASSWORD = "a-long-operator-password-7"
CHROMIUM_ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                      "--disable-background-networking", "--disable-component-update", "--no-first-run",
                      "--disable-sync", "--window-size=1400,1000")


def require_chromium():
    if os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK):
        return
    if os.environ.get("RESILIENCE_TESTS_REQUIRE_CHROMIUM"):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing although .ci/run installed Debian's chromium and "
                    "chromium-driver")
    pytest.skip("chromium not installed (.ci/run installs Debian's chromium and chromium-driver)")


def start_chromium(profile_dir):
    require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


def log_in(browser, base_url, next_path):
    browser.get(f"{base_url}/admin/login/?next={next_path}")
    browser.find_element(By.ID, "id_username").send_keys("operator")
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
