"""The web console with a language model beside a classifier, in Debian's Chromium, all real processes.

The tiny Llama GGUF (tests/unit/llm/tiny_llama) is added with `custodian model add FILE.gguf`,
served by a sim enclave, and chatted with once through `custos-query chat`; the console must show
the deployment's unit (tokens, not inferences) and the same prompt and completion tokens as
`custodian usage --json` (and as the chat's own usage), on the overview, the deployment page and
their JSON twins; the models page shows each model's kind. Screenshots of each page go to
$CUSTOS_CONSOLE_SCREENSHOTS when set (that is how docs/console/ is made).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from client import connect
from testkit.browser import chromium, require_browser
from testkit.processes import DIGITS_SAMPLES, Enclave, poll, script
from tests.unit.llm.tiny_llama.make import GGUF_PATH

from ._console import Console, cookie_of, http, text

pytestmark = pytest.mark.integration

PROMPT = "the quick brown fox"


class Lending(Console):
    """The console's custodian lending the digits classifier and the tiny Llama, each used once."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        added = self.custodian.console("model", "add", str(GGUF_PATH), "--name", "tiny")
        assert added["kind"] == "language"
        self.language, self.language_token = self.deployment(grant=500, model="tiny")
        llm = self.enclave(self.language, self.language_token)
        self.chat_usage = self.chat(llm)
        llm.stop()  # its final report settles the lease
        poll(lambda: self.custodian.usage(self.language)["prompt_tokens"] > 0)

        self.classifier, token = self.deployment(grant=50)
        self.digits = self.enclave(self.classifier, token)
        with connect(self.digits.address, self.end_user_manifest(self.classifier)) as conn:
            for _ in range(4):
                conn.infer_image((DIGITS_SAMPLES / "digit-6.png").read_bytes())

    def chat(self, llm: Enclave) -> dict[str, int]:
        """Ask the language model once, greedily; what the chat says it cost."""
        manifest = self.end_user_manifest(self.language)
        done = subprocess.run(
            [script("custos-query"), "chat", "--enclave", llm.address, "--manifest", str(manifest),
             "--json", "--raw", "--temperature", "0", "--max-tokens", "8", PROMPT],
            env=self.env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        usage: dict[str, int] = json.loads(done.stdout)["usage"]
        return usage


@pytest.fixture(scope="module")
def lending(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lending]:
    require_browser()
    with Lending(tmp_path_factory.mktemp("web-llm")) as system:
        yield system


@pytest.fixture(scope="module")
def browser(lending: Lending) -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        driver.get(lending.login_url())
        yield driver


def _twin(browser: webdriver.Chrome, url: str) -> dict[str, Any]:
    status, body = http(f"{url}?format=json", cookie=cookie_of(browser))
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


def test_a_language_model_deployment_shows_its_tokens_as_custodian_usage_does(
    lending: Lending, browser: webdriver.Chrome
) -> None:
    usage = lending.custodian.usage(lending.language)
    assert usage["unit"] == "token"
    assert usage["completion_tokens"] > 0, "the chat produced nothing: the test would prove little"
    # The custodian's count is the enclave's, which is what the chat was told it cost.
    assert {k: usage[k] for k in lending.chat_usage} == lending.chat_usage
    assert usage["used"] == usage["prompt_tokens"] + usage["completion_tokens"]

    browser.get(lending.base + "/")
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-deployment={lending.language}]")

    def cell(field: str) -> str:
        return str(row.find_element(By.CSS_SELECTOR, f"[data-field={field}]").text)

    assert cell("unit") == "tokens"
    assert cell("prompt_tokens") == str(usage["prompt_tokens"])
    assert cell("completion_tokens") == str(usage["completion_tokens"])
    assert cell("used") == str(usage["used"])
    assert cell("balance") == str(usage["balance"])
    other = browser.find_element(By.CSS_SELECTOR, f"tr[data-deployment={lending.classifier}]")
    assert other.find_element(By.CSS_SELECTOR, "[data-field=unit]").text == "inferences"
    assert other.find_elements(By.CSS_SELECTOR, "[data-field=prompt_tokens]") == []
    overview = {d["name"]: d for d in _twin(browser, lending.base + "/")["deployments"]}
    for name in (lending.language, lending.classifier):
        expected = lending.custodian.usage(name)
        for key in ("unit", "prompt_tokens", "completion_tokens", "used"):
            assert overview[name][key] == expected[key], (name, key)

    page = f"{lending.base}/deployments/{lending.language}"
    browser.get(page)
    assert text(browser, "unit") == "tokens"
    assert text(browser, "prompt-tokens") == str(usage["prompt_tokens"])
    assert text(browser, "completion-tokens") == str(usage["completion_tokens"])
    assert text(browser, "used") == str(usage["used"])
    twin = _twin(browser, page)["deployment"]
    assert (twin["unit"], twin["prompt_tokens"], twin["completion_tokens"]) == (
        "token",
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    live = json.loads(http(f"{page}?format=live", cookie=cookie_of(browser))[1])["live"]
    assert live["prompt_tokens"] == str(usage["prompt_tokens"])
    # The chart counts tokens too: what the receipts prove was used, in this hour (or the last).
    chart = _twin(browser, page)["history"]
    assert sum(chart["used"][-2:]) == usage["used"]

    browser.get(f"{lending.base}/deployments/{lending.classifier}")
    assert text(browser, "unit") == "inferences"
    assert browser.find_elements(By.ID, "prompt-tokens") == []


def test_the_deployment_page_shows_a_chats_tokens_without_a_reload(
    lending: Lending, browser: webdriver.Chrome
) -> None:
    llm = lending.enclave(lending.language, lending.language_token)
    browser.get(f"{lending.base}/deployments/{lending.language}")
    # The same elements throughout: were the page reloaded, reading them would raise.
    prompt, completion = (browser.find_element(By.ID, i) for i in ("prompt-tokens", "completion-tokens"))
    before = int(prompt.text), int(completion.text)
    spent = lending.chat(llm)
    # The enclave reports its receipts as it serves; the page's refresh script shows them.
    poll(lambda: int(prompt.text) == before[0] + spent["prompt_tokens"])
    poll(lambda: int(completion.text) == before[1] + spent["completion_tokens"])
    usage = lending.custodian.usage(lending.language)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (int(prompt.text), int(completion.text))
    llm.stop()


def test_a_grant_of_tokens_says_tokens(lending: Lending, browser: webdriver.Chrome) -> None:
    before = lending.custodian.usage(lending.language)["balance"]
    browser.get(f"{lending.base}/deployments/{lending.language}")
    form = browser.find_element(By.ID, "grant-form")
    assert form.find_element(By.TAG_NAME, "label").text == "Tokens to grant"
    form.find_element(By.NAME, "units").send_keys("25")
    button = form.find_element(By.CSS_SELECTOR, "button[type=submit]")
    button.click()
    WebDriverWait(browser, 10).until(expected_conditions.staleness_of(button))
    assert text(browser, "question") == f"Add 25 tokens to the balance of {lending.language}?"
    confirm = browser.find_element(By.ID, "confirm-button")
    confirm.click()
    WebDriverWait(browser, 10).until(expected_conditions.staleness_of(confirm))
    assert text(browser, "flash") == f"granted 25 tokens; {lending.language} balance is now {before + 25}"
    assert lending.custodian.usage(lending.language)["balance"] == before + 25


def test_the_models_page_shows_each_models_kind(lending: Lending, browser: webdriver.Chrome) -> None:
    listed = {m["name"]: m["kind"] for m in lending.custodian.console("model", "list")}
    assert listed == {"digits": "classifier", "tiny": "language"}
    browser.get(lending.base + "/models")
    shown = {
        str(row.get_attribute("data-model")): row.find_element(By.CSS_SELECTOR, "[data-field=kind]").text
        for row in browser.find_elements(By.CSS_SELECTOR, "#models tbody tr")
    }
    assert shown == listed
    twin = {m["name"]: m["kind"] for m in _twin(browser, lending.base + "/models")["models"]}
    assert twin == listed


def test_screenshots_of_every_page(lending: Lending, browser: webdriver.Chrome, tmp_path: Path) -> None:
    instance = lending.custodian.console("enclaves", "--deployment", lending.classifier)[0]["instance_id"]
    pages = {
        "overview": "/",
        "deployment": f"/deployments/{lending.classifier}",
        "deployment-language": f"/deployments/{lending.language}",
        "enclave": f"/enclaves/{instance}",
        "models": "/models",
        "audit": "/audit",
    }
    out = Path(os.environ.get("CUSTOS_CONSOLE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    for page, path in pages.items():
        browser.get(lending.base + path)
        assert browser.find_element(By.TAG_NAME, "h1").text
        assert "Refused" not in browser.title, page
        assert "401" not in browser.title, page
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, min(max(int(height) + 40, 600), 2400))
        shot = out / f"{page}.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    browser.set_window_size(1280, 900)
    shutil.rmtree(tmp_path, ignore_errors=True)
