"""What the benchmarks need besides ``testkit.processes``: the baseline server, CPU time, start-up timelines.

The custodian and enclave processes, and the rest of the harness, are the ones
the integration tests use (``testkit.processes``). An enclave's log gives its
start-up timeline (``timeline``): every line carries a wall-clock timestamp.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._tls import TlsFiles
from testkit.processes import Enclave, Process, spawn, wait_for_json


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) a process has used so far; this process by default."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # Fields 14 and 15 of proc(5) (utime, stime), counted after the command name's closing parenthesis.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def timeline(enclave: Enclave) -> Timeline:
    """The start-up timeline of ``enclave``, from its log."""
    found: dict[str, float | None] = dict.fromkeys(_EVENTS)
    stages: dict[str, float] = {}
    for line in enclave.log.read_text().splitlines():
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
    return Timeline(spawned=enclave.spawned, **found, **stages)


@dataclass
class Baseline(Process):
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
