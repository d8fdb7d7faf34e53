"""Debian's Chromium, headless, driven by selenium through the system chromedriver.

Never a downloaded browser or driver: ``SE_OFFLINE=true`` stops Selenium
Manager from fetching anything, and the binaries are the ones apt installs
(``apt-get install chromium chromium-driver``). Without them the browser tests
skip and say so; with ``CUSTOS_REQUIRE_BROWSER=1`` (set by ``.ci/run``) that is
a failure instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The flags that keep Chromium from calling home: on a closed network those calls are refused
# and slow every page load.
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


def require_browser() -> None:
    """Skip (or fail, under CUSTOS_REQUIRE_BROWSER=1) when Chromium or its driver is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    reason = f"no {' and no '.join(missing)}: apt-get install chromium chromium-driver"
    if os.environ.get("CUSTOS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CUSTOS_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@contextmanager
def chromium(*, javascript: bool = True) -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium with a profile of its own, quit and removed afterwards."""
    require_browser()
    os.environ["SE_OFFLINE"] = "true"
    profile = tempfile.mkdtemp(prefix="custos-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
