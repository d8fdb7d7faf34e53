"""A real software TPM for tests: swtpm, manufactured by swtpm_setup with EK certificates from a local CA.

``swtpm_setup`` provisions a TPM state once per test session (an RSA-2048 and an
ECC EK with certificates issued by ``swtpm_localca``, whose root and
intermediate live in a temporary directory the tests read; SHA-256 and SHA-384
PCR banks). Each test that starts a TPM gets a copy of that state and its own
``swtpm socket`` process on free loopback ports, stopped at teardown, so every
test sees a freshly booted TPM (PCRs reset) of the same manufactured device.

Missing tools skip the test, unless ``CUSTOS_REQUIRE_TPM=1`` (CI) makes it fail.

Use it through the fixture factory, which keeps test modules free of fixture imports::

    start_swtpm = tpm_support.swtpm_fixture()

    def test_x(start_swtpm: tpm_support.StartSwtpm) -> None:
        tpm = start_swtpm()            # the manufactured TPM (EK certificates, sha256 + sha384)
        other = start_swtpm("blank")   # another TPM: fresh endorsement seed, no EK certificate
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import pytest
from cryptography import x509

from enclave._daemon.tpm_device import TpmAttester

REQUIRE_ENV = "CUSTOS_REQUIRE_TPM"
STARTUP_WAIT_S = 20.0
PROVISION_TIMEOUT_S = 120

TpmKind = Literal["manufactured", "sha256-only", "blank"]


def require(available: bool, what: str, install: str) -> None:
    """Skip when ``what`` is missing, or fail where ``CUSTOS_REQUIRE_TPM=1`` says it must be there."""
    if available:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{what} is required ({REQUIRE_ENV}=1) but not installed: {install}")
    pytest.skip(f"{what} is not installed ({install}); {REQUIRE_ENV}=1, as in CI, makes this a failure")


def require_swtpm() -> None:
    found = all(shutil.which(tool) for tool in ("swtpm", "swtpm_ioctl", "swtpm_setup", "swtpm_localca"))
    require(found, "swtpm", "apt-get install swtpm swtpm-tools")


def require_tpm2_pytss() -> None:
    try:  # importing, not just finding it: it also needs the libtss2 shared libraries
        importlib.import_module("tpm2_pytss")
        available = True
    except ImportError:
        available = False
    require(available, "tpm2-pytss", "apt-get install libtss2-dev && pip install tpm2-pytss")


def require_tpm2_tools() -> None:
    found = all(shutil.which(tool) for tool in ("tpm2_makecredential", "tpm2_getcap"))
    require(found, "tpm2-tools", "apt-get install tpm2-tools")


@dataclass(frozen=True)
class TpmCa:
    """The local CA that issued the manufactured TPM's EK certificates (swtpm_localca's state)."""

    directory: Path

    @property
    def root_pem(self) -> bytes:
        return (self.directory / "swtpm-localca-rootca-cert.pem").read_bytes()

    @property
    def intermediate_pem(self) -> bytes:
        return (self.directory / "issuercert.pem").read_bytes()

    def roots(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.root_pem)

    def intermediates(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.intermediate_pem)


def provision(workdir: Path, *, pcr_banks: str = "sha256,sha384", certificates: bool = True) -> Path:
    """Manufacture a TPM state under ``workdir/state``; with ``certificates``, EK certs from ``workdir/ca``.

    Returns the state directory. The swtpm_setup and swtpm_localca configuration
    files are written next to it, so nothing under /etc or $HOME is used.
    """
    state, ca = workdir / "state", workdir / "ca"
    state.mkdir(parents=True)
    ca.mkdir()
    (workdir / "swtpm-localca.conf").write_text(
        f"statedir = {ca}\n"
        f"signingkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\n"
        f"certserial = {ca}/certserial\n"
    )
    (workdir / "swtpm-localca.options").write_text(
        "--platform-manufacturer Custos\n--platform-version 2.1\n--platform-model test\n"
    )
    (workdir / "swtpm_setup.conf").write_text(
        f"create_certs_tool = {shutil.which('swtpm_localca')}\n"
        f"create_certs_tool_config = {workdir}/swtpm-localca.conf\n"
        f"create_certs_tool_options = {workdir}/swtpm-localca.options\n"
        f"active_pcr_banks = {pcr_banks}\n"
    )
    command = [
        "swtpm_setup",
        "--tpm2",
        "--tpmstate",
        str(state),
        "--config",
        str(workdir / "swtpm_setup.conf"),
        "--pcr-banks",
        pcr_banks,
    ]
    if certificates:
        command[2:2] = ["--create-ek-cert", "--create-platform-cert"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=PROVISION_TIMEOUT_S, check=False, cwd=workdir
    )
    if result.returncode != 0:
        pytest.fail(f"swtpm_setup failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return state


class Swtpm:
    """One ``swtpm socket`` process serving a TPM state directory on loopback TCP."""

    def __init__(self, state_dir: Path, *, startup_clear: bool = True) -> None:
        self.state_dir = state_dir
        self._log_path = state_dir.parent / f"{state_dir.name}.swtpm.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        for _ in range(10):  # another process may take the ports between probing and binding
            self.port = _free_port_pair()
            if self._start(startup_clear):
                return
        pytest.fail(f"swtpm did not start:\n{self._log_path.read_text(errors='replace')}")

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def command(self, startup_clear: bool) -> list[str]:
        flags = "not-need-init,startup-clear" if startup_clear else "not-need-init"
        return [
            "swtpm",
            "socket",
            "--tpmstate",
            f"dir={self.state_dir}",
            "--tpm2",
            "--server",
            f"type=tcp,port={self.port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
            "--flags",
            flags,
        ]

    def _start(self, startup_clear: bool) -> bool:
        self._log = self._log_path.open("ab")
        self._process = subprocess.Popen(
            self.command(startup_clear), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + STARTUP_WAIT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._reap()
                return False
            # Both ports listening, read from the kernel's table: a connection to the TPM's own port
            # would take swtpm's one client slot, and the control port alone can be up first.
            if _listening(self.port) and _listening(self.port + 1):
                return True
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"swtpm did not listen within {STARTUP_WAIT_S} s")

    def init(self) -> None:
        """``TPM_Init`` over the control channel, as at a reboot; the TPM then waits for ``TPM2_Startup``."""
        subprocess.run(
            ["swtpm_ioctl", "--tcp", f"127.0.0.1:{self.port + 1}", "-i"],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._reap()

    def _reap(self) -> None:
        if self._process is not None:
            self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def tools_env(self) -> dict[str, str]:
        """Environment for tpm2-tools against this TPM."""
        return {**os.environ, "TPM2TOOLS_TCTI": self.tcti}


def _listening(port: int) -> bool:
    """Whether a socket listens on 127.0.0.1:``port`` (``/proc/net/tcp``, state 0A)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(
            fields[1] == wanted and fields[3] == "0A"
            for fields in (line.split() for line in table.readlines()[1:])
        )


def _free_port_pair() -> int:
    """A loopback port P such that P and P + 1 (swtpm's control channel) are both free right now."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of loopback ports")


class StartSwtpm(Protocol):
    """The fixture's factory: start a TPM of a kind; all are stopped when the test ends."""

    ca: TpmCa

    def __call__(self, kind: TpmKind = "manufactured", *, startup_clear: bool = True) -> Swtpm: ...


class _Factory:
    def __init__(self, session_dir: Path, test_dir: Path) -> None:
        self._session_dir = session_dir
        self._test_dir = test_dir
        self._started: list[Swtpm] = []
        self.ca = TpmCa(self._template("manufactured").parent / "ca")

    def _template(self, kind: TpmKind) -> Path:
        """The shared, provisioned state of a kind: made once per session (pytest's base temp dir)."""
        workdir = self._session_dir / f"tpm-{kind}"
        state, ready = workdir / "state", workdir / "ready"
        if not ready.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a provisioning that failed half-way
            workdir.mkdir()
            if kind == "manufactured":
                provision(workdir)
            elif kind == "sha256-only":
                provision(workdir, pcr_banks="sha256", certificates=False)
            else:
                state.mkdir()
            ready.touch()
        return state

    def __call__(self, kind: TpmKind = "manufactured", *, startup_clear: bool = True) -> Swtpm:
        copy = self._test_dir / f"tpm{len(self._started)}-{kind}"
        shutil.copytree(self._template(kind), copy)
        tpm = Swtpm(copy, startup_clear=startup_clear)
        self._started.append(tpm)
        return tpm

    def stop_all(self) -> None:
        for tpm in self._started:
            tpm.stop()


def swtpm_fixture(name: str = "start_swtpm") -> Callable[..., Any]:
    """A function-scoped fixture ``name`` yielding a :class:`StartSwtpm` factory.

    Assign it in a test module (``start_swtpm = tpm_support.swtpm_fixture()``).
    It skips (or, with ``CUSTOS_REQUIRE_TPM=1``, fails) where swtpm is missing.
    """

    @pytest.fixture(name=name)
    def _start_swtpm(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Iterator[StartSwtpm]:
        require_swtpm()
        factory = _Factory(tmp_path_factory.getbasetemp(), tmp_path)
        try:
            yield factory
        finally:
            factory.stop_all()

    return _start_swtpm


def attester_fixture(name: str = "open_attester", swtpm: str = "start_swtpm") -> Callable[..., Any]:
    """A fixture ``name`` yielding ``open_attester(tpm=None, **options) -> TpmAttester``.

    It opens :class:`enclave._daemon.tpm_device.TpmAttester` on ``tpm`` (a new
    manufactured swtpm when ``None``) and closes every attester it opened when the
    test ends. Needs the ``swtpm`` fixture (see :func:`swtpm_fixture`) in the module.
    """

    @pytest.fixture(name=name)
    def _open_attester(request: pytest.FixtureRequest) -> Iterator[Callable[..., TpmAttester]]:
        start: StartSwtpm = request.getfixturevalue(swtpm)
        require_tpm2_pytss()
        opened: list[TpmAttester] = []

        def open_attester(tpm: Swtpm | None = None, **options: Any) -> TpmAttester:
            attester = TpmAttester((tpm or start()).tcti, **options)
            opened.append(attester)
            return attester

        try:
            yield open_attester
        finally:
            for attester in opened:
                attester.close()

    return _open_attester
