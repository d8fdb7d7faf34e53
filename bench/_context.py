"""What every scenario gets: the settings of this run, a work directory, TLS files, the Custos system."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench._custos import CustosSystem
from bench._processes import Baseline
from bench._tls import TlsFiles


@dataclass(frozen=True)
class Settings:
    quick: bool
    # 1. inference
    inference_rounds: int
    latency_calls: dict[str, int]
    throughput_seconds: float
    concurrency: int
    # 2. provisioning
    provision_sizes_mib: tuple[int, ...]
    provision_rounds: int
    # 3. ledger
    ledger_instances: int
    ledger_rounds: int
    ledger_seconds: float
    offered_reports_per_second: int
    # 4. attestation
    verify_iterations: int
    enrol_round_trips: int
    # 5. cold start
    cold_start_rounds: int

    @classmethod
    def full(cls) -> Settings:
        return cls(
            quick=False,
            inference_rounds=5,
            latency_calls={"digits": 400, "resnet18": 40},
            throughput_seconds=3.0,
            concurrency=32,
            provision_sizes_mib=(50, 500),
            provision_rounds=3,
            ledger_instances=64,
            ledger_rounds=4,
            ledger_seconds=3.0,
            offered_reports_per_second=2000,
            verify_iterations=500,
            enrol_round_trips=60,
            cold_start_rounds=5,
        )

    @classmethod
    def quick_run(cls) -> Settings:
        return cls(
            quick=True,
            inference_rounds=3,
            latency_calls={"digits": 150, "resnet18": 12},
            throughput_seconds=1.0,
            concurrency=32,
            provision_sizes_mib=(50,),
            provision_rounds=2,
            ledger_instances=32,
            ledger_rounds=2,
            ledger_seconds=1.5,
            offered_reports_per_second=2000,
            verify_iterations=200,
            enrol_round_trips=15,
            cold_start_rounds=3,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Bench:
    settings: Settings
    work: Path
    out: Path
    tls: TlsFiles
    notes: list[str] = field(default_factory=list)
    # Where cProfile output of the custodian and the enclaves goes (``--profile``); None: not profiled.
    profiles: Path | None = None
    _system: CustosSystem | None = None
    _started: float = field(default_factory=time.monotonic)
    _baselines: int = 0

    @property
    def system(self) -> CustosSystem:
        """The custodian, started on first use and shared by the scenarios."""
        if self._system is None:
            self._system = CustosSystem(self.work / "custos", profiles=self.profiles)
        return self._system

    def baseline(self, label: str) -> Baseline:
        """A plain gRPC baseline server, not started yet."""
        self._baselines += 1
        return Baseline(self.work / f"baseline-{self._baselines}-{label}", self.system.env, self.tls)

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self._started:6.1f} s] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._system is not None:
            self._system.close()
