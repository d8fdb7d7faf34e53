"""Real custodian and enclave processes on loopback, driven through their CLIs.

The one harness of the integration tests and the benchmarks: every process
writes its output to a log file (never a pipe that could fill up) and says it
is ready with a JSON file (the custodian's ``endpoints.json``, the enclave's
``--ready-file``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MODEL = ROOT / "bench" / "models" / "digits" / "digits.onnx"
DIGITS_SAMPLES = ROOT / "bench" / "models" / "digits" / "samples"
STARTUP_DEADLINE = 120.0
COMMAND_TIMEOUT = 600.0
_POLL = 0.002  # fine enough for a benchmark to time a start-up by the ready file

T = TypeVar("T")


def script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise RuntimeError(f"console script {name} is missing: pip install -e '.[dev]'")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """Start a process whose stdout and stderr go to ``log`` (never a pipe that could fill up)."""
    with log.open("a") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def wait_for_json(path: Path, proc: subprocess.Popen[str], what: str, log: Path) -> dict[str, Any]:
    """The JSON document ``proc`` writes to ``path`` once it is ready (fail if it exits or takes too long)."""
    deadline = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < deadline:
        if path.exists():
            doc: dict[str, Any] = json.loads(path.read_text())
            return doc
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        time.sleep(_POLL)
    raise RuntimeError(f"{what} did not become ready in {STARTUP_DEADLINE} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def started(proc: subprocess.Popen[str] | None) -> subprocess.Popen[str]:
    if proc is None:
        raise RuntimeError("the process has not been started")
    return proc


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    """Send ``sig`` and wait for the exit (SIGKILL after ``timeout``); the exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def poll(condition: Callable[[], T], *, deadline: float = 20.0, interval: float = 0.1) -> T:
    """Wait until ``condition()`` is truthy; return its value (fail after the deadline)."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {deadline} s: {condition}")
        time.sleep(interval)


def scrape(address: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric ``name`` whose labels include ``labels``."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def isolated_env(work: Path) -> dict[str, str]:
    """Environment for child processes: their own TMPDIR, no inherited Custos settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODIAN_", "ENCLAVE_", "CUSTOS_"))}
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(work / "tmp")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


def profiled(argv: list[str], profile: Path | None) -> list[str]:
    """``argv`` run under cProfile writing ``profile`` (a console script is a Python file), or as it is."""
    if profile is None:
        return argv
    profile.parent.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "cProfile", "-o", str(profile), *argv]


def run(argv: list[str], env: dict[str, str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; with ``check``, a failure raises and names the command, status and stderr."""
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False, cwd=ROOT
    )
    if check and result.returncode != 0:
        command = " ".join([Path(argv[0]).name, *argv[1:]])
        raise RuntimeError(f"{command} failed ({result.returncode}): {result.stderr}")
    return result


def enclave_manifest(
    out: Path, ca: Path, env: dict[str, str], *, platform: str = "sim", extra_args: Sequence[str] = ()
) -> Path:
    """``enclave manifest`` written to ``out``: the code it measures is the code on disk now."""
    run(
        [script("enclave"), "manifest", "--platform", platform, *extra_args,
         "--custodian-ca", str(ca), "--out", str(out)],
        env,
    )  # fmt: skip
    return out


class Process:
    """What the harness's process classes share: the process they may have started (``proc``)."""

    proc: subprocess.Popen[str] | None

    @property
    def pid(self) -> int:
        return started(self.proc).pid

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return stop(started(self.proc), sig)


@dataclass
class Custodian(Process):
    """``custodian serve`` on loopback ports chosen once: a restarted custodian keeps its address."""

    data: Path
    env: dict[str, str]
    profile: Path | None = None  # run under cProfile, writing this file when it stops
    extra_args: Sequence[str] = ()  # more `custodian serve` flags
    enrol_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None
    endpoints: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.data.name}-custodian.log"

    def start(self) -> Custodian:
        (self.data / "endpoints.json").unlink(missing_ok=True)
        argv = [
            script("custodian"), "serve", "--data", str(self.data),
            "--listen", f"127.0.0.1:{self.enrol_port}",
            "--mtls-listen", f"127.0.0.1:{self.gateway_port}",
            "--metrics", "127.0.0.1:0",
            *self.extra_args,
        ]  # fmt: skip
        self.proc = spawn(profiled(argv, self.profile), self.env, self.log)
        self.endpoints = wait_for_json(self.data / "endpoints.json", self.proc, "custodian", self.log)
        return self

    @property
    def enrolment(self) -> str:
        return str(self.endpoints["enrolment"])

    @property
    def gateway(self) -> str:
        return str(self.endpoints["gateway"])

    def metric(self, name: str, **labels: str) -> float:
        return scrape(str(self.endpoints["metrics"]), name, **labels)

    def console(self, *args: str, check: bool = True) -> Any:
        """``custodian ARGS --json``: its parsed output (None when it printed nothing)."""
        result = run([script("custodian"), "--data", str(self.data), *args, "--json"], self.env, check=check)
        return json.loads(result.stdout) if result.stdout.strip() else None

    def ca_pem(self) -> bytes:
        return run([script("custodian"), "--data", str(self.data), "ca"], self.env).stdout.encode()

    def ca_file(self) -> Path:
        """The custodian's CA certificate, written next to its data directory."""
        path = self.data.parent / "custodian-ca.pem"
        path.write_bytes(self.ca_pem())
        return path

    def usage(self, deployment: str) -> dict[str, Any]:
        doc = self.console("usage", deployment)
        rows = doc["deployments"] if isinstance(doc, dict) and "deployments" in doc else doc
        row: dict[str, Any] = next(r for r in rows if r["name"] == deployment)
        return row


@dataclass
class Enclave(Process):
    """``enclave serve`` in ``workdir``, enrolling with a custodian."""

    workdir: Path
    env: dict[str, str]
    profile: Path | None = None  # run under cProfile, writing this file when it stops
    proc: subprocess.Popen[str] | None = None
    ready: dict[str, Any] = field(default_factory=dict)
    spawned: float = 0.0  # time.time() when the process was started

    @property
    def log(self) -> Path:
        return self.workdir / "enclave.log"

    @property
    def ready_file(self) -> Path:
        return self.workdir / "enclave-ready.json"

    def start(
        self,
        custodian: Custodian | Sequence[Custodian],
        ca: Path,
        deployment: str,
        token: str,
        *,
        wait: bool = True,
        platform: str = "sim",
        extra_args: Sequence[str] = (),
    ) -> Enclave:
        # Several custodians: the replicas of one, tried in order (enclave serve --custodian A,B).
        replicas = [custodian] if isinstance(custodian, Custodian) else list(custodian)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        argv = [
            script("enclave"), "serve",
            "--custodian", ",".join(c.enrolment for c in replicas),
            "--custodian-ca", str(ca),
            "--deployment", deployment,
            "--listen", "127.0.0.1:0",
            "--platform", platform,
            *extra_args,
            "--metrics", "127.0.0.1:0",
            "--ready-file", str(self.ready_file),
        ]  # fmt: skip
        # The join token goes in the environment: command lines show in the process list.
        env = {**self.env, "ENCLAVE_TOKEN": token}
        self.spawned = time.time()
        self.proc = spawn(profiled(argv, self.profile), env, self.log)
        return self.wait_ready() if wait else self

    def wait_ready(self) -> Enclave:
        self.ready = wait_for_json(self.ready_file, started(self.proc), "enclave", self.log)
        return self

    @property
    def address(self) -> str:
        return str(self.ready["inference"])

    def metric(self, name: str, **labels: str) -> float:
        return scrape(str(self.ready["metrics"]), name, **labels)


@contextlib.contextmanager
def stopping(*procs: Process, sig: int = signal.SIGTERM) -> Iterator[None]:
    """Stop the started processes (``sig``, SIGKILL after a while), last first, however the block ends."""
    try:
        yield
    finally:
        for p in reversed(procs):
            if p.proc is not None:
                p.stop(sig)


def running(*procs: Process) -> contextlib.AbstractContextManager[None]:
    """Kill the started processes (SIGKILL), last first, however the block ends."""
    return stopping(*procs, sig=signal.SIGKILL)
