"""Real custodian, enclave and baseline processes on loopback, driven through their CLIs.

The same approach as the integration tests (real processes, ready files,
logs to files, never pipes), written again here because benchmarks do not
import from ``tests/``. The enclave's log also gives its start-up timeline
(``Enclave.timeline``): every line carries a wall-clock timestamp.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._tls import TlsFiles

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MODEL = ROOT / "bench" / "models" / "digits" / "digits.onnx"
DIGITS_SAMPLES = ROOT / "bench" / "models" / "digits" / "samples"
STARTUP_DEADLINE = 120.0
_POLL = 0.002


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
    """Start a process whose stdout and stderr go to ``log``."""
    with log.open("a") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def wait_for_json(path: Path, proc: subprocess.Popen[str], what: str, log: Path) -> dict[str, Any]:
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


def _pid(proc: subprocess.Popen[str] | None) -> int:
    if proc is None:
        raise RuntimeError("the process has not been started")
    return proc.pid


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) a process has used so far; this process by default."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # Fields 14 and 15 of proc(5) (utime, stime), counted after the command name's closing parenthesis.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profiled(argv: list[str], profile: Path | None) -> list[str]:
    """``argv`` run under cProfile writing ``profile`` (a console script is a Python file), or as it is."""
    if profile is None:
        return argv
    profile.parent.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "cProfile", "-o", str(profile), *argv]


def isolated_env(work: Path) -> dict[str, str]:
    """Environment for child processes: their own TMPDIR, no inherited Custos settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODIAN_", "ENCLAVE_", "CUSTOS_"))}
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(work / "tmp")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


@dataclass
class Custodian:
    data: Path
    env: dict[str, str]
    profile: Path | None = None  # run under cProfile, writing this file when it stops
    proc: subprocess.Popen[str] | None = None
    endpoints: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.data.parent / "custodian.log"

    @property
    def pid(self) -> int:
        return _pid(self.proc)

    def start(self) -> Custodian:
        (self.data / "endpoints.json").unlink(missing_ok=True)
        argv = [script("custodian"), "serve", "--data", str(self.data), "--listen", "127.0.0.1:0"]
        self.proc = spawn(profiled(argv, self.profile), self.env, self.log)
        self.endpoints = wait_for_json(self.data / "endpoints.json", self.proc, "custodian", self.log)
        return self

    @property
    def enrolment(self) -> str:
        return str(self.endpoints["enrolment"])

    @property
    def gateway(self) -> str:
        return str(self.endpoints["gateway"])

    def console(self, *args: str) -> Any:
        result = subprocess.run(
            [script("custodian"), "--data", str(self.data), *args, "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"custodian {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def ca_pem(self) -> bytes:
        result = subprocess.run(
            [script("custodian"), "--data", str(self.data), "ca"],
            env=self.env,
            capture_output=True,
            check=True,
            timeout=60,
        )
        return result.stdout

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@dataclass(frozen=True)
class Timeline:
    """Wall-clock instants (``time.time()``) of an enclave's start-up, from its log."""

    spawned: float
    code_measured: float | None
    enrol_started: float | None  # the configuration is measured, enrolment starts at once
    enrolled: float | None
    model_received: float | None  # fetched, decrypted and its SHA-384 checked
    model_loaded: float | None  # onnxruntime session built
    serving: float | None
    # Seconds the enclave's ModelOpener spent decrypting and hashing (wall clock, and CPU time
    # of the threads doing it), from the "received" line.
    decrypt_seconds: float | None = None
    decrypt_cpu_seconds: float | None = None
    hash_seconds: float | None = None
    hash_cpu_seconds: float | None = None


_EVENTS = {
    "code_measured": "measured code ",
    "enrol_started": "measured config ",
    "enrolled": "enrolled as instance",
    "model_received": " received: ",
    "model_loaded": "model loaded:",
    "serving": "serving on ",
}


_OPENING = re.compile(
    r"received: .*\(decrypt ([0-9.]+) s, ([0-9.]+) s CPU; SHA-384 ([0-9.]+) s, ([0-9.]+) s CPU\)"
)


def _log_time(line: str) -> float | None:
    # logging's default asctime: "2025-01-31 12:34:56,789", local time.
    try:
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return stamp.timestamp()


@dataclass
class Enclave:
    workdir: Path
    env: dict[str, str]
    profile: Path | None = None  # run under cProfile, writing this file when it stops
    proc: subprocess.Popen[str] | None = None
    ready: dict[str, Any] = field(default_factory=dict)
    spawned: float = 0.0

    @property
    def log(self) -> Path:
        return self.workdir / "enclave.log"

    @property
    def pid(self) -> int:
        return _pid(self.proc)

    @property
    def ready_file(self) -> Path:
        return self.workdir / "enclave-ready.json"

    def start(self, custodian: Custodian, ca: Path, deployment: str, token: str) -> Enclave:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        argv = [
            script("enclave"),
            "serve",
            "--custodian",
            custodian.enrolment,
            "--custodian-ca",
            str(ca),
            "--deployment",
            deployment,
            "--listen",
            "127.0.0.1:0",
            "--platform",
            "sim",
            "--ready-file",
            str(self.ready_file),
        ]
        env = {**self.env, "ENCLAVE_TOKEN": token}
        self.spawned = time.time()
        self.proc = spawn(profiled(argv, self.profile), env, self.log)
        return self

    def wait_ready(self) -> Enclave:
        assert self.proc is not None
        self.ready = wait_for_json(self.ready_file, self.proc, "enclave", self.log)
        return self

    @property
    def address(self) -> str:
        return str(self.ready["inference"])

    def timeline(self) -> Timeline:
        found: dict[str, float | None] = dict.fromkeys(_EVENTS)
        stages: dict[str, float] = {}
        for line in self.log.read_text().splitlines():
            for name, marker in _EVENTS.items():
                if found[name] is None and marker in line:
                    found[name] = _log_time(line)
            if not stages and (match := _OPENING.search(line)):
                stages = {
                    name: float(match[group])
                    for group, name in enumerate(
                        ("decrypt_seconds", "decrypt_cpu_seconds", "hash_seconds", "hash_cpu_seconds"), 1
                    )
                }
        return Timeline(spawned=self.spawned, **found, **stages)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@dataclass
class Baseline:
    """The plain gRPC baseline server (``bench._baseline``) as a process."""

    workdir: Path
    env: dict[str, str]
    tls: TlsFiles
    proc: subprocess.Popen[str] | None = None
    ready: dict[str, Any] = field(default_factory=dict)
    spawned: float = 0.0

    @property
    def log(self) -> Path:
        return self.workdir / "baseline.log"

    @property
    def pid(self) -> int:
        return _pid(self.proc)

    def start(
        self, *, model: Path | None = None, stream_file: Path | None = None, mtls: bool = False
    ) -> Baseline:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready_file = self.workdir / "baseline-ready.json"
        ready_file.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "bench._baseline",
            "--cert",
            str(self.tls.server_cert),
            "--key",
            str(self.tls.server_key),
            "--ready-file",
            str(ready_file),
        ]
        if model is not None:
            argv += ["--model", str(model)]
        if stream_file is not None:
            argv += ["--stream-file", str(stream_file)]
        if mtls:
            argv += ["--client-ca", str(self.tls.client_ca)]
        self.spawned = time.time()
        self.proc = spawn(argv, self.env, self.log)
        self.ready = wait_for_json(ready_file, self.proc, "baseline server", self.log)
        return self

    @property
    def address(self) -> str:
        return str(self.ready["tls"])

    @property
    def mtls_address(self) -> str:
        return str(self.ready["mtls"])

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@contextlib.contextmanager
def stopping(*procs: Custodian | Enclave | Baseline) -> Iterator[None]:
    """Stop the processes (SIGTERM, then SIGKILL) however the block ends."""
    try:
        yield
    finally:
        for p in reversed(procs):
            p.stop()
