"""Nitro Enclaves and NitroTPM end to end, without AWS: enrolment, model push and a verified query.

The enclave process on ``nitro-enclave`` asks a double of the Nitro Secure
Module (installed by a ``sitecustomize`` on its own ``PYTHONPATH``, in place of
the device only: request, response and checks run as shipped); on
``nitro-tpm`` it runs a double of ``nitro-tpm-attest``. Both sign with a
synthetic AWS-shaped chain (testkit.nitro). The custodian process trusts that
chain's root through its own ``sitecustomize``, this process through
``trusting_root``; the shipped tools keep the AWS Nitro Root-G1 pinned. A
double that replays a recorded real document never gets the enclave enrolled.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import connect
from client.errors import VerificationRefusedError
from testkit.nitro import ENCLAVE_PCRS, TPM_PCRS, NitroPki, registers, site_directory, trusting_root
from testkit.nitro_doubles import nsm_site_directory, tpm_tool
from testkit.processes import (
    DIGITS_MODEL,
    DIGITS_SAMPLES,
    Custodian,
    Enclave,
    enclave_manifest,
    isolated_env,
    running,
)

pytestmark = pytest.mark.integration
VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors"
PINS = {"nitro-enclave": (ENCLAVE_PCRS, (0, 1, 2)), "nitro-tpm": (TPM_PCRS, (4, 7, 12))}


class NitroSystem:
    """A custodian process trusting the synthetic root, with the demo model, and Nitro enclaves."""

    def __init__(self, tmp: Path, pki: NitroPki) -> None:
        self.tmp = tmp
        self.pki = pki
        self.env = isolated_env(tmp)
        site = site_directory(tmp / "site", pki.root_sha256)
        trusting_env = {**self.env, "PYTHONPATH": f"{site}:{self.env['PYTHONPATH']}"}
        self.custodian = Custodian(tmp / "data", trusting_env).start()
        self.ca = self.custodian.ca_file()
        self.custodian.console("model", "add", str(DIGITS_MODEL), "--name", "digits")
        self.enclaves: list[Enclave] = []

    def deploy(self, platform: str) -> str:
        pcrs, pinned = PINS[platform]
        pins = [
            arg
            for name, value in registers(pcrs, pinned).items()
            for arg in ("--register", f"{name}={value}")
        ]
        manifest = enclave_manifest(
            self.tmp / f"{platform}.toml", self.ca, self.env, platform=platform, extra_args=pins
        )
        created = self.custodian.console(
            "deployment", "create", platform, "--model", "digits", "--manifest", str(manifest)
        )
        self.custodian.console("grant", platform, "5")
        return str(created["join_token"])

    def enclave(
        self, platform: str, token: str, *, replay: bytes | None = None, wait: bool = True
    ) -> Enclave:
        number = len(self.enclaves)
        env = dict(self.env)
        if platform == "nitro-enclave":
            site = nsm_site_directory(self.tmp / f"nsm-{number}", self.pki.to_pem(), replay=replay)
            env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
            device = self.tmp / f"nsm-{number}" / "nsm"  # exists; the double answers in its place
            device.write_bytes(b"")
            args: tuple[str, ...] = ("--nsm-device", str(device))
        else:
            tool = tpm_tool(self.tmp / f"tool-{number}", self.pki.to_pem(), replay=replay)
            args = ("--nitro-tpm-attest", str(tool))
        enclave = Enclave(self.tmp / f"enclave-{number}", env)
        self.enclaves.append(enclave)
        return enclave.start(
            self.custodian, self.ca, platform, token, platform=platform, extra_args=args, wait=wait
        )

    def end_user_manifest(self, name: str) -> Path:
        path = self.tmp / f"{name}-end-user.toml"
        self.custodian.console("deployment", "manifest", name, "--out", str(path))
        return path

    def close(self) -> None:
        with running(self.custodian, *self.enclaves):
            pass


@pytest.fixture(scope="module")
def pki() -> NitroPki:
    return NitroPki()


@pytest.fixture
def system(tmp_path: Path, pki: NitroPki) -> Iterator[NitroSystem]:
    with trusting_root(pki.root_sha256):
        nitro_system = NitroSystem(tmp_path, pki)
        try:
            yield nitro_system
        finally:
            nitro_system.close()


@pytest.mark.parametrize("platform", ["nitro-enclave", "nitro-tpm"])
def test_enrolment_model_push_and_a_verified_query(system: NitroSystem, platform: str) -> None:
    token = system.deploy(platform)
    enclave = system.enclave(platform, token)
    manifest = system.end_user_manifest(platform)
    with connect(enclave.address, manifest) as conn:
        result = conn.infer_image((DIGITS_SAMPLES / "digit-3.png").read_bytes())
        details = conn.appraisal.platform.details
    assert result.top[0].label == "three"
    assert details["platform"] == platform
    assert "NOT the AWS Nitro Root-G1" in details["checks"][0]
    rows = system.custodian.console("enclaves")
    rows = rows["enclaves"] if isinstance(rows, dict) else rows
    assert [row["platform"] for row in rows if row["deployment"] == platform] == [platform]


def test_a_manifest_for_other_pcrs_refuses_the_query(system: NitroSystem, tmp_path: Path) -> None:
    token = system.deploy("nitro-enclave")
    enclave = system.enclave("nitro-enclave", token)
    manifest = system.end_user_manifest("nitro-enclave")
    other = tmp_path / "other.toml"
    other.write_text(manifest.read_text().replace(ENCLAVE_PCRS[2], "ee" * 48))
    with pytest.raises(VerificationRefusedError, match="register pcr2 is"):
        connect(enclave.address, other)


@pytest.mark.parametrize("platform", ["nitro-enclave", "nitro-tpm"])
def test_an_attester_replaying_a_recorded_real_document_never_enrols(
    system: NitroSystem, platform: str
) -> None:
    """The enclave checks what its NSM (or tool) gave it before sending it: a replay ends it.

    That the custodian refuses such a document for its nonce, when sent all the same, is
    tests/unit/custodian/test_enrolment_nitro.py.
    """
    recorded = base64.b64decode((VECTORS / "nitro/blocky_nitro_attestation.b64").read_bytes())
    token = system.deploy(platform)
    enclave = system.enclave(platform, token, replay=recorded, wait=False)
    assert enclave.proc is not None
    assert enclave.proc.wait(timeout=60) == 1
    log = enclave.log.read_text()
    expected = (
        "does not carry the nonce" if platform == "nitro-enclave" else "from nitro-enclave, not nitro-tpm"
    )
    assert expected in log
    rows = system.custodian.console("enclaves")
    rows = rows["enclaves"] if isinstance(rows, dict) else rows
    assert not [row for row in rows if row["deployment"] == platform]
