"""The Custos side of the benchmarks: one real custodian, models added and deployments made through its CLI.

Models reach an enclave only the real way: ``custodian model add``, a
deployment approving the manifest ``enclave manifest`` wrote, a grant, and an
``enclave serve`` process that enrols and is pushed the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from enclave.attestation import MeasurementEvent
from enclave.attestation.measurement import code_event
from testkit.processes import Custodian, Enclave, enclave_manifest, isolated_env

# Enough units that no benchmark ever runs a deployment dry.
GRANT = 10**11
_ATTEMPTS = 3


@dataclass(frozen=True)
class Deployment:
    name: str
    token: str = field(repr=False)
    # What end users verify the enclave against (`custodian deployment manifest`).
    end_user_manifest: Path
    code: MeasurementEvent = field(repr=False)


class CustosSystem:
    def __init__(self, work: Path, *, profiles: Path | None = None) -> None:
        """``profiles``: run the custodian and every enclave under cProfile, writing there."""
        self.work = work
        self.env = isolated_env(work)
        self._profiles = profiles
        custodian_profile = profiles / "custodian.prof" if profiles else None
        self.custodian = Custodian(work / "custodian", self.env, profile=custodian_profile).start()
        self.ca = self.custodian.ca_file()
        self.enclave_manifest = work / "enclave.toml"
        self._models: dict[str, str] = {}
        self._enclaves = 0
        self._deployments = 0

    def _write_enclave_manifest(self) -> Path:
        """``enclave manifest`` for this build, written afresh: the code measurement covers the sources
        as they are now (they may change while a long benchmark runs, for instance in a shared checkout)."""
        return enclave_manifest(self.enclave_manifest, self.ca, self.env)

    def add_model(self, path: Path, name: str) -> str:
        """``custodian model add``; returns the model's SHA-384 (hex). Adds a name once."""
        if name not in self._models:
            info = self.custodian.console("model", "add", str(path), "--name", name)
            self._models[name] = str(info["sha384"])
        return self._models[name]

    def deployment(self, prefix: str, model: str, *, lease_size: int = 0) -> Deployment:
        """A new deployment of ``model`` under this build's sim manifest, granted plenty.

        ``Deployment.code`` is this build's code measurement taken right after the manifest was
        written, for simulated instances (``bench._sim_enclave``) to present.
        """
        self._deployments += 1
        name = f"{prefix}-{self._deployments}"
        manifest = self._write_enclave_manifest()
        code = code_event()
        args = ["deployment", "create", name, "--model", model, "--manifest", str(manifest)]
        if lease_size:
            args += ["--lease-size", str(lease_size)]
        created = self.custodian.console(*args)
        self.custodian.console("grant", name, str(GRANT))
        end_user = self.work / f"{name}-end-user.toml"
        self.custodian.console("deployment", "manifest", name, "--out", str(end_user))
        return Deployment(name, str(created["join_token"]), end_user, code)

    def enclave(self, deployment: Deployment) -> Enclave:
        """Start (without waiting for it) an enclave that enrols in ``deployment``."""
        self._enclaves += 1
        workdir = self.work / f"enclave-{self._enclaves}-{deployment.name}"
        profile = self._profiles / f"{workdir.name}.prof" if self._profiles else None
        enclave = Enclave(workdir, self.env, profile=profile)
        return enclave.start(self.custodian, self.ca, deployment.name, deployment.token, wait=False)

    def serving_enclave(
        self, prefix: str, model: str, *, lease_size: int = 0, deployment: Deployment | None = None
    ) -> tuple[Enclave, Deployment]:
        """An enclave serving ``deployment`` (a new one unless given), once ready.

        When the enclave is refused because the sources changed since its manifest was written
        (someone edited the checkout meanwhile), it tries again in a new deployment with a fresh manifest.
        """
        for attempt in range(_ATTEMPTS):
            deployment = deployment or self.deployment(prefix, model, lease_size=lease_size)
            enclave = self.enclave(deployment)
            try:
                return enclave.wait_ready(), deployment
            except RuntimeError as exc:
                enclave.stop()
                if "code measurement" not in str(exc) or attempt == _ATTEMPTS - 1:
                    raise
                deployment = None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.custodian.stop()
