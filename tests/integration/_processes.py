"""Real custodian and enclave processes on loopback, driven through their CLIs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "bench" / "models" / "digits" / "digits.onnx"
SAMPLES = ROOT / "bench" / "models" / "digits" / "samples"
STARTUP_DEADLINE = 60.0


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


def wait_for_file(path: Path, proc: subprocess.Popen[str], what: str, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < deadline:
        if path.exists():
            doc: dict[str, Any] = json.loads(path.read_text())
            return doc
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready in {STARTUP_DEADLINE} s:\n{log.read_text()}")


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """Start a process whose stdout and stderr go to ``log`` (never a pipe that could fill up)."""
    with log.open("a") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def poll(condition: Any, *, deadline: float = 20.0, interval: float = 0.1) -> Any:
    """Wait until ``condition()`` is truthy; return its value (fail after the deadline)."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {deadline} s: {condition}")
        time.sleep(interval)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def scrape(address: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric ``name`` whose labels include ``labels``."""
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@dataclass
class Custodian:
    data: Path
    env: dict[str, str]
    enrol_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None
    endpoints: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.data.name}-custodian.log"

    def start(self) -> Custodian:
        (self.data / "endpoints.json").unlink(missing_ok=True)
        self.proc = spawn(
            [
                script("custodian"),
                "serve",
                "--data",
                str(self.data),
                "--listen",
                f"127.0.0.1:{self.enrol_port}",
                "--mtls-listen",
                f"127.0.0.1:{self.gateway_port}",
                "--metrics",
                "127.0.0.1:0",
            ],
            self.env,
            self.log,
        )
        self.endpoints = wait_for_file(self.data / "endpoints.json", self.proc, "custodian", self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return stop(self.proc, sig)

    def metric(self, name: str, **labels: str) -> float:
        return scrape(str(self.endpoints["metrics"]), name, **labels)

    def console(self, *args: str, check: bool = True) -> Any:
        result = subprocess.run(
            [script("custodian"), "--data", str(self.data), *args, "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"custodian {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def ca_file(self) -> Path:
        path = self.data.parent / "custodian-ca.pem"
        result = subprocess.run(
            [script("custodian"), "--data", str(self.data), "ca"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        path.write_text(result.stdout)
        return path

    def usage(self, deployment: str) -> dict[str, Any]:
        doc = self.console("usage", deployment)
        rows = doc["deployments"] if isinstance(doc, dict) and "deployments" in doc else doc
        row: dict[str, Any] = next(r for r in rows if r["name"] == deployment)
        return row


@dataclass
class Enclave:
    workdir: Path
    env: dict[str, str]
    proc: subprocess.Popen[str] | None = None
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.workdir / "enclave.log"

    def start(
        self,
        custodian: Custodian,
        ca: Path,
        deployment: str,
        token: str,
        *,
        wait: bool = True,
        platform: str = "sim",
        extra_args: tuple[str, ...] = (),
    ) -> Enclave:
        ready_file = self.workdir / "enclave-ready.json"
        ready_file.unlink(missing_ok=True)
        self.proc = spawn(
            [
                script("enclave"),
                "serve",
                "--custodian",
                f"127.0.0.1:{custodian.enrol_port}",
                "--custodian-ca",
                str(ca),
                "--deployment",
                deployment,
                "--token",
                token,
                "--listen",
                "127.0.0.1:0",
                "--platform",
                platform,
                *extra_args,
                "--metrics",
                "127.0.0.1:0",
                "--ready-file",
                str(ready_file),
            ],
            self.env,
            self.log,
        )
        if wait:
            self.ready = wait_for_file(ready_file, self.proc, "enclave", self.log)
        return self

    @property
    def address(self) -> str:
        return str(self.ready["inference"])

    def metric(self, name: str, **labels: str) -> float:
        return scrape(str(self.ready["metrics"]), name, **labels)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return stop(self.proc, sig)


def isolated_env(tmp: Path) -> dict[str, str]:
    """Environment for child processes: their own TMPDIR, no inherited custodian settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODIAN_", "ENCLAVE_", "CUSTOS_"))}
    (tmp / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp / "tmp")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def running(*procs: Custodian | Enclave) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(procs):
            if p.proc is not None:
                stop(p.proc, signal.SIGKILL)
