"""The web console in Debian's Chromium, against a real `custodian serve --console` and a real enclave.

What it holds the console to: the one-time login URL opens one session; nothing
answers without one; the overview lists the deployments; a grant through the
form changes the balance on the page and in `custodian usage`; a suspend through
the page makes a running enclave refuse within a second; the usage chart draws
the receipts' numbers; a POST without the CSRF token is refused and changes
nothing. A language model's deployment, and the screenshots, are in
test_web_console_language.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from client import connect
from client.errors import SuspendedError
from enclave.attestation import Evidence
from testkit.browser import chromium, require_browser
from testkit.processes import DIGITS_SAMPLES, poll

from ._console import Console, cookie_of, http, text

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    require_browser()
    with Console(tmp_path_factory.mktemp("web")) as system:
        yield system


@pytest.fixture(scope="module")
def browser(console: Console) -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        driver.get(console.login_url())
        yield driver


def _confirm(driver: webdriver.Chrome, form_id: str, units: str = "") -> str:
    """Submit a deployment action's form, then confirm; returns the confirmation question."""
    form = driver.find_element(By.ID, form_id)
    if units:
        form.find_element(By.NAME, "units").send_keys(units)
    _navigate(driver, form.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    question = text(driver, "question")
    _navigate(driver, driver.find_element(By.ID, "confirm-button"))
    return question


def _navigate(driver: webdriver.Chrome, button: WebElement) -> None:
    """Click a button that submits a form, and wait for the page it leads to."""
    button.click()
    WebDriverWait(driver, 10).until(expected_conditions.staleness_of(button))


def test_nothing_answers_without_a_session(console: Console) -> None:
    name, _ = console.deployment()
    for path in ("/", "/models", "/audit", "/audit/export", f"/deployments/{name}", "/enclaves/x",
                 "/static/console.css", "/static/live.js", "/?format=json", "/nowhere"):  # fmt: skip
        status, body = http(console.base + path)
        assert status == 401, path
        assert name not in body, path
        assert "csrf_token" not in body, path
    for path in (f"/deployments/{name}/grant", f"/deployments/{name}/suspend", "/logout"):
        assert http(console.base + path, data=b"units=5&confirm=yes")[0] == 401, path
    status, _ = http(console.base + "/", cookie="custos_console=forged")
    assert status == 401
    # Outside the secret path nothing answers but the page saying how to log in, even a login
    # URL's secret moved to where it would be without the path.
    secret = console.login_url().rpartition("/")[2]
    for path in ("/", "/models", f"/login/{secret}", "/c/", "/static/console.css"):
        status, body = http(f"{console.address}{path}")
        assert status == 401, path
        assert console.base not in body, path
    assert console.custodian.usage(name)["balance"] == 0
    assert not console.custodian.usage(name)["suspended"]


class _CookieCatcher(BaseHTTPRequestHandler):
    """Another local user's server on another loopback port: records the cookies browsers send it."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Cookie", ""))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_another_server_on_this_host_gets_no_session_cookie(
    console: Console, browser: webdriver.Chrome
) -> None:
    # Browsers send a cookie to every port of its host: the console's cookie is scoped to its
    # secret path, which no other server can guess (found in review: with Path=/ it was sent).
    with ThreadingHTTPServer(("127.0.0.1", 0), _CookieCatcher) as catcher:
        threading.Thread(target=catcher.serve_forever, daemon=True).start()
        try:
            port = catcher.server_address[1]
            for path in ("/", "/deployments/x", "/c/", "/login/x"):
                browser.get(f"http://127.0.0.1:{port}{path}")
                assert "hello" in browser.page_source
        finally:
            catcher.shutdown()
    assert len(_CookieCatcher.seen) >= 4
    assert not [c for c in _CookieCatcher.seen if "custos_console" in c]
    browser.get(console.base + "/")
    assert browser.find_elements(By.ID, "deployments")  # still logged in there


def test_a_login_url_opens_one_session_and_the_overview_lists_deployments(console: Console) -> None:
    names = [console.deployment(grant=3)[0], console.deployment(grant=4)[0]]
    url = console.login_url()
    with chromium() as driver:
        driver.get(url)
        assert driver.current_url == console.base + "/"
        cookie = driver.get_cookie("custos_console")
        assert cookie is not None
        assert cookie["httpOnly"]
        assert cookie["sameSite"] == "Strict"
        rows = {
            row.get_attribute("data-deployment"): row
            for row in driver.find_elements(By.CSS_SELECTOR, "#deployments tbody tr")
        }
        for name, balance in zip(names, ("3", "4"), strict=True):
            assert rows[name].find_element(By.CSS_SELECTOR, "[data-field=balance]").text == balance
            assert rows[name].find_element(By.CSS_SELECTOR, "[data-field=state]").text == "active"
        driver.delete_all_cookies()
        driver.get(url)  # the same link again
        assert "not valid" in text(driver, "reason")
        assert driver.get_cookie("custos_console") is None
        driver.get(console.base + "/")
        assert "Not logged in" in driver.find_element(By.TAG_NAME, "h1").text
    secret = url.rpartition("/")[2]
    log = console.custodian.log.read_text()
    assert secret not in log
    assert str(cookie["value"]) not in log


def test_granting_through_the_form_changes_the_balance_and_is_audited(
    console: Console, browser: webdriver.Chrome
) -> None:
    name, _ = console.deployment(grant=5)
    browser.get(f"{console.base}/deployments/{name}")
    assert text(browser, "balance") == "5"
    question = _confirm(browser, "grant-form", units="7")
    assert question == f"Add 7 units to the balance of {name}?"
    assert browser.current_url == f"{console.base}/deployments/{name}"
    assert text(browser, "flash") == f"granted 7 units; {name} balance is now 12"
    assert text(browser, "balance") == "12"
    assert console.custodian.usage(name)["balance"] == 12
    last = console.custodian.console("audit", "--last", "1")["last"][0]
    assert (last["action"], last["subject"], last["detail"]["units"]) == ("quota.grant", name, 7)
    assert last["detail"]["origin"].startswith(f"web console {console.address} session ")
    assert console.base.rpartition("/")[2] not in last["detail"]["origin"]  # the secret path stays out
    assert "(claimed)" in last["detail"]["origin"]


def test_bad_input_and_cancel_change_nothing(console: Console, browser: webdriver.Chrome) -> None:
    name, _ = console.deployment(grant=5)
    browser.get(f"{console.base}/deployments/{name}")
    form = browser.find_element(By.ID, "grant-form")
    browser.execute_script("arguments[0].removeAttribute('pattern')", form.find_element(By.NAME, "units"))
    form.find_element(By.NAME, "units").send_keys("-3")
    _navigate(driver=browser, button=form.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    assert "units must be a whole number from 1 to" in text(browser, "reason")
    assert "Traceback" not in browser.page_source
    browser.get(f"{console.base}/deployments/{name}")
    _navigate(browser, browser.find_element(By.ID, "suspend-button"))
    _navigate(browser, browser.find_element(By.LINK_TEXT, "Cancel"))
    assert text(browser, "state") == "active"
    assert console.custodian.usage(name)["balance"] == 5
    assert not console.custodian.usage(name)["suspended"]


def test_a_post_without_the_csrf_token_is_refused(console: Console, browser: webdriver.Chrome) -> None:
    name, _ = console.deployment(grant=5)
    browser.get(f"{console.base}/deployments/{name}")
    token = browser.find_element(By.NAME, "csrf_token").get_attribute("value")
    cookie = cookie_of(browser)
    url = f"{console.base}/deployments/{name}/grant"
    for form in (
        b"units=5&confirm=yes",
        b"units=5&confirm=yes&csrf_token=",
        b"units=5&confirm=yes&csrf_token=x",
    ):
        status, body = http(url, data=form, cookie=cookie)
        assert status == 403
        assert "CSRF" in body
    assert console.custodian.usage(name)["balance"] == 5
    # The same request with the session's token goes through: the refusal was the token's.
    status, _ = http(url, data=f"units=5&confirm=yes&csrf_token={token}".encode(), cookie=cookie)
    assert status == 200
    assert console.custodian.usage(name)["balance"] == 10


def test_suspend_through_the_page_makes_a_running_enclave_refuse_within_one_second(
    console: Console, browser: webdriver.Chrome
) -> None:
    name, token = console.deployment(grant=200)
    enclave = console.enclave(name, token)
    image = (DIGITS_SAMPLES / "digit-6.png").read_bytes()
    with connect(enclave.address, console.end_user_manifest(name)) as conn:
        conn.infer_image(image)
        browser.get(f"{console.base}/deployments/{name}")
        assert poll(lambda: browser.find_element(By.CSS_SELECTOR, "#instances tbody td:nth-child(3)").text)
        _navigate(browser, browser.find_element(By.ID, "suspend-button"))
        browser.find_element(By.ID, "confirm-button").click()
        clicked = time.monotonic()

        def refused() -> bool:
            try:
                conn.infer_image(image)
            except SuspendedError:
                return True
            return False

        assert poll(refused, deadline=5, interval=0.02)
        assert time.monotonic() - clicked < 1.0
        WebDriverWait(browser, 10).until(
            expected_conditions.text_to_be_present_in_element((By.ID, "state"), "suspended")
        )
        assert console.custodian.usage(name)["suspended"]


def test_the_overview_shows_a_suspend_without_a_reload(console: Console, browser: webdriver.Chrome) -> None:
    name, _ = console.deployment(grant=1)
    browser.get(console.base + "/")
    cell = browser.find_element(By.CSS_SELECTOR, f"tr[data-deployment={name}] [data-field=state]")
    assert cell.text == "active"
    console.custodian.console("suspend", name)
    done = time.monotonic()
    poll(lambda: cell.text == "suspended", deadline=5, interval=0.05)
    assert time.monotonic() - done < 1.0
    console.custodian.console("grant", name, "41")
    poll(
        lambda: (
            browser.find_element(By.CSS_SELECTOR, f"tr[data-deployment={name}] [data-field=balance]").text
            == "42"
        )
    )


def test_the_usage_chart_draws_the_receipts(console: Console, browser: webdriver.Chrome) -> None:
    name, token = console.deployment(grant=20)
    enclave = console.enclave(name, token)
    image = (DIGITS_SAMPLES / "digit-6.png").read_bytes()
    with connect(enclave.address, console.end_user_manifest(name)) as conn:
        for _ in range(3):
            conn.infer_image(image)
    enclave.stop()  # its final report carries the last receipt
    assert poll(lambda: console.custodian.usage(name)["used"] == 3)
    browser.get(f"{console.base}/deployments/{name}")
    chart = browser.find_element(By.ID, "usage-chart")
    assert chart.get_attribute("data-span") == "hour"
    bars: dict[str, list[tuple[str, int, float]]] = {"granted": [], "used": []}
    for rect in chart.find_elements(By.CSS_SELECTOR, "rect.bar"):
        bars[str(rect.get_attribute("data-series"))].append(
            (str(rect.get_attribute("data-bucket")), int(str(rect.get_attribute("data-value"))),
             float(str(rect.get_attribute("height"))))
        )  # fmt: skip
    assert len(bars["granted"]) == len(bars["used"]) == 24
    # All of it in this hour (or the one before, should the test straddle an hour's end).
    recent = {b for b, _, _ in bars["used"][-2:]}
    used = [(b, v) for b, v, _ in bars["used"] if v]
    granted = [(b, v) for b, v, _ in bars["granted"] if v]
    assert sum(v for _, v in used) == 3
    assert sum(v for _, v in granted) == 20
    assert {b for b, _ in used + granted} <= recent
    # Drawn to scale: every bar's height is its value times the same factor.
    scale = max(h for _, _, h in bars["granted"]) / 20
    for _, value, height in bars["used"] + bars["granted"]:
        assert height == pytest.approx(value * scale, abs=0.02)
    twin = json.loads(http(f"{console.base}/deployments/{name}?format=json", cookie=cookie_of(browser))[1])
    assert twin["history"]["used"][-1] == 3
    assert sum(sum(v) for v in twin["history"]["used_by_instance"].values()) == 3
    browser.get(f"{console.base}/deployments/{name}?span=day")
    days = browser.find_elements(By.CSS_SELECTOR, "#usage-chart rect.bar.used")
    assert len(days) == 30
    assert sum(int(str(d.get_attribute("data-value"))) for d in days[-2:]) == 3


def test_the_enclave_page_shows_its_evidence_and_state(console: Console, browser: webdriver.Chrome) -> None:
    name, token = console.deployment(grant=10)
    enclave = console.enclave(name, token)
    listed = console.custodian.console("enclaves", "--deployment", name)[0]
    browser.get(f"{console.base}/enclaves/{listed['instance_id']}")
    assert text(browser, "state") == "connected"
    registers = {
        row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
        for row in browser.find_elements(By.CSS_SELECTOR, "#registers tbody tr")
    }
    assert sorted(registers) == ["sim.app", "sim.boot"]
    assert all(len(bytes.fromhex(v)) == 48 for v in registers.values())
    kinds = [row.find_elements(By.TAG_NAME, "td")[1].text for row in browser.find_elements(
        By.CSS_SELECTOR, "#measurement-log tbody tr")]  # fmt: skip
    assert kinds == ["instance", "code", "config"]  # what a sim enclave measures before its model
    status, body = http(
        f"{console.base}/enclaves/{listed['instance_id']}/evidence", cookie=cookie_of(browser)
    )
    assert status == 200
    evidence = Evidence.from_bytes(body.encode())
    assert evidence.platform == "sim"
    enclave.stop()
    poll(lambda: text(browser, "state") == "stopped", deadline=10)


def test_revoke_resume_and_rotate_token_through_the_page(console: Console, browser: webdriver.Chrome) -> None:
    name, _ = console.deployment(grant=9)
    browser.get(f"{console.base}/deployments/{name}")
    assert "Take back 4 units" in _confirm(browser, "revoke-form", units="4")
    assert text(browser, "balance") == "5"
    _confirm(browser, "suspend-form")
    assert text(browser, "state") == "suspended"
    assert _confirm(browser, "suspend-form") == f"Let {name} serve again?"  # the form resumes now
    assert text(browser, "state") == "active"
    _confirm(browser, "rotate-form")
    token = text(browser, "token")
    assert token.startswith("cjt_")
    assert len(token) > 40
    actions = [e["action"] for e in console.custodian.console("audit", "--last", "4")["last"]]
    assert actions == ["quota.revoke", "deployment.suspend", "deployment.resume", "deployment.rotate_token"]
    assert console.custodian.usage(name)["balance"] == 5


def test_the_audit_log_pages_filters_and_exports(
    console: Console, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    name, _ = console.deployment()
    browser.get(f"{console.base}/deployments/{name}")
    token = browser.find_element(By.NAME, "csrf_token").get_attribute("value")
    for _ in range(55):
        form = f"units=1&confirm=yes&csrf_token={token}".encode()
        assert (
            http(f"{console.base}/deployments/{name}/grant", data=form, cookie=cookie_of(browser))[0] == 200
        )
    browser.get(console.base + "/audit")
    assert text(browser, "chain-state") == "verified"
    browser.find_element(By.ID, "subject").send_keys(name)
    browser.find_element(By.ID, "action").send_keys("quota.grant")
    _navigate(browser, browser.find_element(By.CSS_SELECTOR, "#audit-filter button"))
    first = browser.find_elements(By.CSS_SELECTOR, "#audit tbody tr")
    assert len(first) == 50
    assert {r.find_element(By.CLASS_NAME, "action").text for r in first} == {"quota.grant"}
    seqs = [int(str(r.get_attribute("data-seq"))) for r in first]
    _navigate(browser, browser.find_element(By.ID, "older"))
    rest = [
        int(str(r.get_attribute("data-seq")))
        for r in browser.find_elements(By.CSS_SELECTOR, "#audit tbody tr")
    ]
    assert len(rest) == 5
    assert max(rest) < min(seqs)
    assert seqs == sorted(seqs, reverse=True)
    assert browser.find_elements(By.ID, "older") == []
    status, body = http(console.base + "/audit/export", cookie=cookie_of(browser))
    assert status == 200
    export = tmp_path / "audit.jsonl"
    export.write_text(body)
    verified = console.custodian.console("audit", "verify", str(export))
    assert verified["entries"] >= 55


def test_logging_out_ends_the_session(console: Console) -> None:
    with chromium() as driver:
        driver.get(console.login_url())
        cookie = cookie_of(driver)
        _navigate(driver, driver.find_element(By.CSS_SELECTOR, ".logout button"))
        assert text(driver, "reason") == "Logged out."
        assert http(console.base + "/", cookie=cookie)[0] == 401
        driver.get(console.base + "/models")
        assert "Not logged in" in driver.find_element(By.TAG_NAME, "h1").text


def test_a_grant_with_the_keyboard_alone(console: Console, browser: webdriver.Chrome) -> None:
    name, _ = console.deployment(grant=1)
    browser.get(f"{console.base}/deployments/{name}")
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    for _ in range(30):
        if browser.switch_to.active_element.get_attribute("id") == "grant-units":
            break
        browser.switch_to.active_element.send_keys(Keys.TAB)
    field = browser.switch_to.active_element
    assert field.get_attribute("id") == "grant-units"
    field.send_keys("2", Keys.ENTER)
    WebDriverWait(browser, 10).until(expected_conditions.staleness_of(field))
    confirm = browser.switch_to.active_element  # the confirm button takes the focus
    assert confirm.get_attribute("id") == "confirm-button"
    confirm.send_keys(Keys.ENTER)
    WebDriverWait(browser, 10).until(expected_conditions.staleness_of(confirm))
    assert text(browser, "balance") == "3"


def test_every_page_reads_without_javascript(console: Console) -> None:
    name, _ = console.deployment(grant=6)
    with chromium(javascript=False) as driver:
        driver.get(console.login_url())
        row = driver.find_element(By.CSS_SELECTOR, f"tr[data-deployment={name}]")
        assert row.find_element(By.CSS_SELECTOR, "[data-field=balance]").text == "6"
        driver.get(f"{console.base}/deployments/{name}")
        assert text(driver, "balance") == "6"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#usage-chart rect.bar")) == 48
        driver.get(console.base + "/audit")
        assert "quota.grant" in [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#audit .action")]
        # JavaScript is really off: the refresh script, which marks each refresh, never ran.
        time.sleep(1.2)
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-refreshed") is None
