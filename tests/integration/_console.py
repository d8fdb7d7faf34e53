"""What the browser tests of the web console share: a custodian serving it, and HTTP beside the browser."""

from __future__ import annotations

import itertools
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.common.by import By

from testkit.processes import enclave_manifest

from ._loopback import Loopback

_names = (f"web{i}" for i in itertools.count())


class Console(Loopback):
    """A custodian serving the web console on a loopback port, with the demo model."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, custodian_args=["--console", "127.0.0.1:0"])
        self.enclave_manifest = enclave_manifest(tmp / "enclave.toml", self.ca, self.env)
        # Where it listens; its pages are under the secret path that login URLs carry.
        self.address = str(self.custodian.endpoints["console"])
        self.base = self.login_url().split("/login/")[0]

    def deployment(self, *, grant: int = 0, model: str = "digits") -> tuple[str, str]:
        name = next(_names)
        created = self.custodian.console(
            "deployment", "create", name, "--model", model, "--manifest", str(self.enclave_manifest)
        )
        if grant:
            self.custodian.console("grant", name, str(grant))
        return name, created["join_token"]

    def login_url(self) -> str:
        url: str = self.custodian.console("console", "login")["url"]
        return url


def http(url: str, *, data: bytes | None = None, cookie: str = "") -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if cookie:
        request.add_header("Cookie", cookie)
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def cookie_of(driver: webdriver.Chrome) -> str:
    cookie: dict[str, Any] = driver.get_cookie("custos_console") or {}
    return f"custos_console={cookie.get('value', '')}"


def text(driver: webdriver.Chrome, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)
