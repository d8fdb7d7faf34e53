"""TDX and SGX end to end, without the hardware: enrolment, model push and a verified query.

The enclave process reads its quotes from a quote double (a configfs-tsm entry
for ``tdx``, Gramine's ``/dev/attestation`` for ``sgx``) that signs genuine DCAP
quotes over each report data with a synthetic PCK chain; a local PCS v4 double
serves that chain's collateral. The custodian process trusts the synthetic root
through a ``sitecustomize`` on its own ``PYTHONPATH``, this process through
``monkeypatch``: the shipped tools keep the Intel SGX Root CA pinned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

import enclave.attestation.dcap
from client import connect
from client.errors import VerificationRefusedError
from enclave.attestation import ReferenceValues
from testkit.dcap import FMSPC, Pki, crl, level, qe_identity, signed, tcb_info
from testkit.pcs import PcsDouble, pcs_double
from testkit.processes import (
    DIGITS_MODEL,
    DIGITS_SAMPLES,
    Custodian,
    Enclave,
    enclave_manifest,
    isolated_env,
    run,
    running,
    script,
)
from testkit.quote_double import SGX_REGISTERS, TDX_REGISTERS, quote_double
from testkit.trust_root import site_directory

pytestmark = pytest.mark.integration
TCB_PATH = "/tdx/certification/v4/tcb?fmspc=" + FMSPC.hex().upper()


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def serve_collateral(
    pcs: PcsDouble, pki: Pki, platform: str, *, issued: datetime, evaluation: int = 17
) -> None:
    """Intel-shaped collateral for the double's platform, signed by the synthetic TCB Signing key."""
    dates = {"issued": _stamp(issued), "next": _stamp(issued + timedelta(days=30)), "evaluation": evaluation}
    pem = serialization.Encoding.PEM
    chain = pki.signing.public_bytes(pem) + pki.root.public_bytes(pem)
    if platform == "tdx":
        info = tcb_info([level()], **dates)
        identity = qe_identity([(4, "UpToDate")], **dates)
    else:
        info = tcb_info([level(tdx=None)], id="SGX", **dates)
        identity = qe_identity([(4, "UpToDate")], id="QE", isvprodid=1, **dates)
    pcs.tcb_info(platform, FMSPC.hex(), signed(pki, "tcbInfo", info), chain)
    pcs.qe_identity(platform, signed(pki, "enclaveIdentity", identity), chain)
    pcs.pck_crl(
        "platform",
        crl(pki.ca, pki.ca_key, this=issued),
        pki.ca.public_bytes(pem) + pki.root.public_bytes(pem),
    )
    pcs.root_ca_crl(crl(pki.root, pki.root_key, this=issued))


class DcapSystem:
    """A custodian process trusting the synthetic root, with the demo model, and a quote-double enclave."""

    def __init__(self, tmp: Path, pki: Pki, pcs: PcsDouble) -> None:
        self.tmp = tmp
        self.pki = pki
        self.pcs = pcs
        self.env = isolated_env(tmp)
        site = site_directory(tmp / "site", pki.root_der)
        self.trusting_env = {**self.env, "PYTHONPATH": f"{site}:{self.env['PYTHONPATH']}"}
        self.custodian = Custodian(tmp / "data", self.trusting_env, extra_args=("--pccs", pcs.url)).start()
        self.ca = self.custodian.ca_file()
        self.custodian.console("model", "add", str(DIGITS_MODEL), "--name", "digits")
        self.enclaves: list[Enclave] = []

    def deploy(self, platform: str) -> str:
        registers = TDX_REGISTERS if platform == "tdx" else SGX_REGISTERS
        pins = [arg for name, value in registers.items() for arg in ("--register", f"{name}={value}")]
        manifest = enclave_manifest(
            self.tmp / f"{platform}.toml", self.ca, self.env, platform=platform, extra_args=pins
        )
        created = self.custodian.console(
            "deployment", "create", platform, "--model", "digits", "--manifest", str(manifest)
        )
        self.custodian.console("grant", platform, "5")
        return str(created["join_token"])

    def enclave(self, platform: str, token: str, device: Path, *, pccs: str = "") -> Enclave:
        flag = "--tsm-entry" if platform == "tdx" else "--gramine-root"
        enclave = Enclave(self.tmp / f"enclave-{len(self.enclaves)}", self.env)
        self.enclaves.append(enclave)
        args = (flag, str(device), "--pccs", pccs or self.pcs.url)
        return enclave.start(self.custodian, self.ca, platform, token, platform=platform, extra_args=args)

    def end_user_manifest(self, name: str) -> Path:
        path = self.tmp / f"{name}-end-user.toml"
        self.custodian.console("deployment", "manifest", name, "--out", str(path))
        return path

    def close(self) -> None:
        with running(self.custodian, *self.enclaves):
            pass


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture
def system(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Iterator[DcapSystem]:
    monkeypatch.setattr(enclave.attestation.dcap, "INTEL_SGX_ROOT_CA_DER", pki.root_der)
    with pcs_double() as pcs:
        dcap = DcapSystem(tmp_path, pki, pcs)
        try:
            yield dcap
        finally:
            dcap.close()


@pytest.mark.parametrize("platform", ["tdx", "sgx"])
def test_enrolment_model_push_and_a_verified_query(system: DcapSystem, platform: str) -> None:
    serve_collateral(system.pcs, system.pki, platform, issued=datetime.now(UTC) - timedelta(hours=1))
    token = system.deploy(platform)
    device = system.tmp / ("tsm-entry" if platform == "tdx" else "attestation")
    with quote_double(system.pki, device, platform) as double:
        enclave = system.enclave(platform, token, device)
        manifest = system.end_user_manifest(platform)
        reference = ReferenceValues.from_toml(manifest.read_text())
        assert reference.accepted_tcb_statuses == ("UpToDate",)
        # The client fetches nothing: the evidence carries Intel's (here: the double's) collateral.
        asked = len(system.pcs.requests)
        with connect(enclave.address, manifest) as conn:
            result = conn.infer_image((DIGITS_SAMPLES / "digit-3.png").read_bytes())
            details = conn.appraisal.platform.details
        assert len(system.pcs.requests) == asked
        # Enrolment, the TLS certificate's evidence and the client's nonce: a quote each at least.
        assert double.quotes >= 3
    assert result.top[0].label == "three"
    assert details["tcb_status"] == "UpToDate"
    assert set(details["collateral_sources"].values()) == {"evidence"}
    assert "report_data" in details["checks_done"]
    assert (
        system.tmp / "data" / "collateral" / "intel" / f"{platform}-tcb-{FMSPC.hex().upper()}.json"
    ).is_file()
    rows = system.custodian.console("enclaves")
    rows = rows["enclaves"] if isinstance(rows, dict) else rows
    assert [row["platform"] for row in rows if row["deployment"] == platform] == [platform]


def test_a_manifest_floor_above_the_collateral_refuses_the_query(system: DcapSystem, tmp_path: Path) -> None:
    serve_collateral(
        system.pcs, system.pki, "tdx", issued=datetime.now(UTC) - timedelta(hours=1), evaluation=17
    )
    token = system.deploy("tdx")
    device = tmp_path / "tsm-entry"
    with quote_double(system.pki, device, "tdx"):
        enclave = system.enclave("tdx", token, device)
        manifest = system.end_user_manifest("tdx")
        strict = tmp_path / "strict.toml"
        strict.write_text(
            manifest.read_text().replace(
                "\n[registers]", "min_tcb_evaluation_data_number = 18\n\n[registers]", 1
            )
        )
        with pytest.raises(
            VerificationRefusedError, match="evaluation data number 17; the manifest requires at least 18"
        ):
            connect(enclave.address, strict)
        with connect(enclave.address, manifest) as conn:
            assert conn.appraisal.platform.details["tcb_status"] == "UpToDate"


def test_the_custodian_uses_its_fresher_copy_where_the_enclave_carries_expired_collateral(
    system: DcapSystem, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    serve_collateral(system.pcs, system.pki, "tdx", issued=now - timedelta(hours=1))
    token = system.deploy("tdx")
    device = tmp_path / "tsm-entry"
    with pcs_double() as stale_pcs, quote_double(system.pki, device, "tdx"):
        # The enclave's service has only collateral that expired yesterday.
        serve_collateral(stale_pcs, system.pki, "tdx", issued=now - timedelta(days=31))
        enclave = system.enclave("tdx", token, device, pccs=stale_pcs.url)  # enrolled: the custodian's copy
        assert any(path.startswith("/tdx/certification/v4/tcb") for path in stale_pcs.requests)
        with pytest.raises(VerificationRefusedError, match="expired at"):
            connect(enclave.address, system.end_user_manifest("tdx"))


def test_an_end_user_fetches_what_the_evidence_does_not_carry(system: DcapSystem, tmp_path: Path) -> None:
    serve_collateral(system.pcs, system.pki, "sgx", issued=datetime.now(UTC) - timedelta(hours=1))
    token = system.deploy("sgx")
    device = tmp_path / "attestation"
    with quote_double(system.pki, device, "sgx"):
        enclave = system.enclave("sgx", token, device, pccs="off")  # enrolled on the custodian's copy
        manifest = system.end_user_manifest("sgx")
        with pytest.raises(VerificationRefusedError, match="TCB status was not evaluated"):
            connect(enclave.address, manifest)
        query = [script("custos-query"), "--enclave", enclave.address, "--manifest", str(manifest), "--json"]
        image = str(DIGITS_SAMPLES / "digit-3.png")
        refused = run([*query, "--pccs", "off", image], system.trusting_env, check=False)
        assert refused.returncode != 0
        assert "TCB status was not evaluated" in refused.stdout
        answered = run([*query, "--pccs", system.pcs.url, image], system.trusting_env)
    doc = json.loads(answered.stdout)
    assert doc["verified"] is True
    assert doc["top"][0]["label"] == "three"
