"""What the integration tests' systems share: a custodian with the demo model, enclaves started against it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Self

from testkit.processes import DIGITS_MODEL, Custodian, Enclave, isolated_env, running


class Loopback:
    """A custodian process in ``tmp`` with the demo model added as ``digits``; enclave processes on demand."""

    def __init__(self, tmp: Path, *, custodian_args: Sequence[str] = ()) -> None:
        self.tmp = tmp
        self.env = isolated_env(tmp)
        self.custodian = Custodian(tmp / "data", self.env, extra_args=custodian_args).start()
        self.ca = self.custodian.ca_file()
        self.custodian.console("model", "add", str(DIGITS_MODEL), "--name", "digits")
        self.enclaves: list[Enclave] = []

    def end_user_manifest(self, name: str) -> Path:
        path = self.tmp / f"{name}-end-user.toml"
        self.custodian.console("deployment", "manifest", name, "--out", str(path))
        return path

    def enclave(
        self,
        name: str,
        token: str,
        *,
        wait: bool = True,
        ca: Path | None = None,
        platform: str = "sim",
        extra_args: Sequence[str] = (),
    ) -> Enclave:
        """An enclave process enrolling in deployment ``name`` (ready, unless not ``wait``)."""
        enclave = Enclave(self.tmp / f"enclave-{len(self.enclaves)}", self.env)
        self.enclaves.append(enclave)
        return enclave.start(
            self.custodian, ca or self.ca, name, token, wait=wait, platform=platform, extra_args=extra_args
        )

    def refused(self, enclave: Enclave) -> str:
        """The log of an enclave that must exit with status 1 (its enrolment refused)."""
        assert enclave.proc is not None
        enclave.proc.wait(timeout=60)
        log = enclave.log.read_text()
        assert enclave.proc.returncode == 1, log
        return log

    def close(self) -> None:
        with running(self.custodian, *self.enclaves):
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
