"""The TPM attester against a real software TPM (swtpm, see tests/tpm_support.py).

A genuine quote over a genuine measurement log must pass ``TpmVerifier`` and
the whole appraisal (report data binding, log replay into PCR 15, reference
values); each way of getting it wrong must be refused with its reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from custodian.authority import CertificateAuthority
from enclave import identity
from enclave._daemon.errors import TpmDeviceError
from enclave._daemon.tpm_device import TpmAttester, parse_pcr_list
from enclave.attestation import AttestedClaims, Evidence, ReferenceValues, appraise
from enclave.attestation.claims import replay
from enclave.attestation.measurement import code_event, config_event, model_event
from enclave.attestation.tpm import TpmVerifier
from enclave.attestation.tpm_ak import load_ak
from enclave.errors import AttestationError, BindingError, EvidenceError, PolicyError
from tests import tpm_support

start_swtpm = tpm_support.swtpm_fixture()
open_attester = tpm_support.attester_fixture()

OpenAttester = Callable[..., TpmAttester]
CA_DER = b"test custodian ca"
MODEL_SHA384 = hashlib.sha384(b"a model").digest()
BOOT_PCRS = tuple(range(10))  # the classic boot chain up to the OS


@dataclass
class TpmEnclave:
    """An attester that measured a real log, and the claims that describe it."""

    attester: TpmAttester
    claims: AttestedClaims

    def evidence(self, claims: AttestedClaims | None = None) -> bytes:
        return self.attester.collect((claims or self.claims).report_data()).to_bytes()

    def reference(self, **changes: Any) -> ReferenceValues:
        bank = self.attester.log_bank
        size = hashlib.new(bank).digest_size
        ref = ReferenceValues(
            platform="tpm",
            allow_simulation=False,
            custodian_ca_sha256=hashlib.sha256(CA_DER).hexdigest(),
            code_sha384=self.claims.events("code")[0].sha384.hex(),
            allowed_model_sha384=(MODEL_SHA384.hex(),),
            # swtpm has no firmware: its boot PCRs stay at their reset value.
            registers={
                f"pcr.{bank}.{i}": "00" * size for i in self.attester.quote_pcrs if i != self.attester.app_pcr
            },
            # Tests about the quote itself may quote fewer PCRs than the boot chain.
            allow_unmeasured_os=not set(BOOT_PCRS) <= set(self.attester.quote_pcrs),
        )
        return replace(ref, **changes)

    def appraise(self, evidence: bytes | None = None, **overrides: Any) -> Any:
        arguments: dict[str, Any] = {
            "claims": self.claims.to_bytes(),
            "reference": self.reference(),
            "now": datetime.now(UTC),
            "nonce": self.claims.nonce,
            "public_key": self.claims.public_key,
            "purpose": "enrol",
            "deployment": "demo",
            "require_model": True,
            # As the custodian at enrolment: AK trust comes from the credential round, not here.
            "tpm_credential": True,
        }
        arguments.update(overrides)
        return appraise(evidence if evidence is not None else self.evidence(), **arguments)


def measured(attester: TpmAttester) -> TpmEnclave:
    log = (code_event(), config_event(CA_DER), model_event(MODEL_SHA384))
    for event in log:
        attester.extend(event.digests())
    claims = AttestedClaims(
        nonce=os.urandom(32),
        public_key=identity.public_key_der(identity.generate_identity_key()),
        deployment="demo",
        platform="tpm",
        purpose="enrol",
        log=log,
    )
    return TpmEnclave(attester=attester, claims=claims)


def test_genuine_quote_passes_the_verifier_and_the_appraisal(open_attester: OpenAttester) -> None:
    enclave = measured(open_attester(quote_pcrs=BOOT_PCRS))
    evidence = enclave.evidence()

    parsed = Evidence.from_bytes(evidence)
    assert parsed.platform == "tpm"
    assert set(parsed.parts) == {"quote", "signature", "ak", "pcrs"}
    assert parsed.parts["ak"] == enclave.attester.ak_public
    assert load_ak(parsed.parts["ak"]).encoding == "tpmt_public"

    claims = TpmVerifier().verify(parsed, report_data=enclave.claims.report_data(), now=datetime.now(UTC))
    assert claims.report_data == enclave.claims.report_data()
    assert claims.log_register == "pcr.sha384.15"
    assert set(claims.registers) == {f"pcr.sha384.{i}" for i in (*BOOT_PCRS, 15)}
    assert claims.registers["pcr.sha384.15"] == replay(enclave.claims.log, "sha384")
    assert claims.details["signature_scheme"] == "rsassa-sha256"
    assert claims.details["ak_trust"] == "none"

    appraisal = enclave.appraise(evidence)
    assert not appraisal.simulated
    assert appraisal.model_sha384 == MODEL_SHA384
    assert enclave.attester.read_pcrs([15]) == {15: replay(enclave.claims.log, "sha384")}


def _wrong_nonce(enclave: TpmEnclave) -> tuple[bytes, dict[str, Any]]:
    return enclave.evidence(), {"nonce": os.urandom(32)}


def _quote_for_other_claims(enclave: TpmEnclave) -> tuple[bytes, dict[str, Any]]:
    other = replace(enclave.claims, nonce=os.urandom(32))
    return enclave.evidence(other), {}


def _claims_for_another_key(enclave: TpmEnclave) -> tuple[bytes, dict[str, Any]]:
    return enclave.evidence(), {"public_key": identity.public_key_der(identity.generate_identity_key())}


def _pcr_value_changed(enclave: TpmEnclave) -> tuple[bytes, dict[str, Any]]:
    evidence = Evidence.from_bytes(enclave.evidence())
    pcrs = json.loads(evidence.parts["pcrs"])
    pcrs["sha384"]["0"] = "11" * 48
    parts = {**evidence.parts, "pcrs": json.dumps(pcrs).encode()}
    return Evidence(platform="tpm", parts=parts).to_bytes(), {}


def _log_does_not_replay(enclave: TpmEnclave) -> tuple[bytes, dict[str, Any]]:
    enclave.attester.extend(model_event(hashlib.sha384(b"another model").digest()).digests())
    return enclave.evidence(), {}


def _event_left_out_of_the_claims(enclave: TpmEnclave) -> tuple[bytes, dict[str, Any]]:
    shorter = replace(enclave.claims, log=enclave.claims.log[:-1])
    return enclave.evidence(shorter), {"claims": shorter.to_bytes(), "require_model": False}


def _signature_flipped(enclave: TpmEnclave) -> tuple[bytes, dict[str, Any]]:
    evidence = Evidence.from_bytes(enclave.evidence())
    signature = bytearray(evidence.parts["signature"])
    signature[-1] ^= 1
    parts = {**evidence.parts, "signature": bytes(signature)}
    return Evidence(platform="tpm", parts=parts).to_bytes(), {}


def _ek_presented_as_ak(enclave: TpmEnclave) -> tuple[bytes, dict[str, Any]]:
    evidence = Evidence.from_bytes(enclave.evidence())
    parts = {**evidence.parts, "ak": enclave.attester.ek_public}
    return Evidence(platform="tpm", parts=parts).to_bytes(), {}


def _boot_pcr_not_the_manifests(enclave: TpmEnclave) -> tuple[bytes, dict[str, Any]]:
    reference = enclave.reference(registers={**enclave.reference().registers, "pcr.sha384.0": "22" * 48})
    return enclave.evidence(), {"reference": reference}


@pytest.mark.parametrize(
    ("tamper", "error", "reason"),
    [
        pytest.param(_wrong_nonce, BindingError, "claims do not carry the expected nonce", id="wrong-nonce"),
        pytest.param(
            _quote_for_other_claims,
            BindingError,
            "quote extraData does not match the expected nonce",
            id="quote-for-other-claims",
        ),
        pytest.param(
            _claims_for_another_key, BindingError, "claims are for another public key", id="another-key"
        ),
        pytest.param(
            _pcr_value_changed,
            EvidenceError,
            "PCR values do not match the quote's pcrDigest",
            id="pcr-value-changed",
        ),
        pytest.param(
            _log_does_not_replay,
            BindingError,
            "measurement log does not replay to register pcr.sha384.15",
            id="log-does-not-replay",
        ),
        pytest.param(
            _event_left_out_of_the_claims,
            BindingError,
            "measurement log does not replay to register pcr.sha384.15",
            id="event-left-out",
        ),
        pytest.param(
            _signature_flipped, EvidenceError, "quote signature does not verify", id="signature-flipped"
        ),
        pytest.param(
            _ek_presented_as_ak,
            EvidenceError,
            "not those of a restricted signing key",
            id="ek-as-ak",
        ),
        pytest.param(
            _boot_pcr_not_the_manifests,
            PolicyError,
            "register pcr.sha384.0 is 0000",
            id="boot-pcr-differs",
        ),
    ],
)
def test_refused_with_the_reason(
    open_attester: OpenAttester,
    tamper: Callable[[TpmEnclave], tuple[bytes, dict[str, Any]]],
    error: type[AttestationError],
    reason: str,
) -> None:
    enclave = measured(open_attester(quote_pcrs=BOOT_PCRS))
    evidence, overrides = tamper(enclave)
    with pytest.raises(error, match=reason):
        enclave.appraise(evidence, **overrides)


def _certificate(
    subject_key: Any, issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, issuer: str = "AK CA"
) -> x509.Certificate:
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AK CA" if ca else "AK")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def test_ak_certificate_makes_the_ak_trusted(open_attester: OpenAttester, tmp_path: Path) -> None:
    """The custodian's AK CA certifies the swtpm's AK: end users trust it through ``[tpm] ak_roots``."""
    enclave = measured(open_attester())
    now = datetime.now(UTC)
    ak_ca = CertificateAuthority.load_or_create(tmp_path, "ak-ca", "AK CA", now=now)
    enclave_ca = CertificateAuthority.load_or_create(tmp_path, "enclave-ca", "enclave CA", now=now)
    ak_key = load_ak(enclave.attester.ak_public).key
    ak_cert = ak_ca.issue_ak(ak_key, "instance", now=now, validity=timedelta(days=1)).public_bytes(
        serialization.Encoding.DER
    )
    ca_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="for another key than this TPM's AK"):
        enclave.attester.use_ak_certificate(
            _certificate(ca_key.public_key(), ca_key, ca=False).public_bytes(serialization.Encoding.DER)
        )
    # What enclave._daemon.enrolment turns into a ProtocolError: both kinds of unusable certificate.
    with pytest.raises(EvidenceError):
        enclave.attester.use_ak_certificate(b"not a certificate")

    enclave.attester.use_ak_certificate(ak_cert)
    evidence = enclave.evidence()
    assert Evidence.from_bytes(evidence).parts["ak_cert"] == ak_cert

    def as_end_user(roots: CertificateAuthority) -> Any:
        reference = enclave.reference(tpm_ak_roots=roots.pem.decode())
        return enclave.appraise(evidence, reference=reference, tpm_credential=False)

    assert as_end_user(ak_ca).platform.details["ak_trust"] == "certificate"
    with pytest.raises(EvidenceError, match="AK certificate chain stops"):
        as_end_user(enclave_ca)


def test_sha256_bank_where_sha384_is_not_allocated(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    enclave = measured(open_attester(start_swtpm("sha256-only"), quote_pcrs=BOOT_PCRS))
    assert enclave.attester.log_bank == "sha256"
    appraisal = enclave.appraise()
    assert appraisal.platform.log_register == "pcr.sha256.15"
    assert appraisal.platform.registers["pcr.sha256.15"] == replay(enclave.claims.log, "sha256")


def test_ecc_attestation_key(open_attester: OpenAttester) -> None:
    enclave = measured(open_attester(key_type="ecc"))
    appraisal = enclave.appraise()
    assert appraisal.platform.details["signature_scheme"] == "ecdsa-sha256"


def test_other_application_pcr_and_every_pcr_quoted(open_attester: OpenAttester) -> None:
    enclave = measured(open_attester(app_pcr=14, quote_pcrs=range(24)))
    report_data = enclave.claims.report_data()
    evidence = Evidence.from_bytes(enclave.evidence())
    claims = TpmVerifier(app_pcr=14).verify(evidence, report_data=report_data, now=datetime.now(UTC))
    assert claims.log_register == "pcr.sha384.14"
    assert claims.registers["pcr.sha384.14"] == replay(enclave.claims.log, "sha384")
    assert len(claims.registers) == 24  # more than one TPM2_PCR_Read's worth
    assert claims.registers["pcr.sha384.15"] == bytes(48)


def test_starts_a_tpm_nobody_started(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    enclave = measured(open_attester(start_swtpm(startup_clear=False)))
    enclave.appraise()


def test_first_extend_refuses_a_pcr_extended_since_reset(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    tpm = start_swtpm()
    first = open_attester(tpm)
    first.extend(code_event().digests())
    first.close()
    second = open_attester(tpm)  # a restarted daemon without a reboot: its log would not replay
    with pytest.raises(TpmDeviceError, match="PCR 15 \\(sha384\\) was already extended"):
        second.extend(code_event().digests())


def test_keys_are_recreated_after_a_tpm_reset(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    from enclave.attestation.tpm_credential import make_credential

    tpm = start_swtpm()
    attester = open_attester(tpm)
    ak_public, report_data = attester.ak_public, os.urandom(64)
    attester.collect(report_data)
    tpm.init()
    attester._tpm.esys.startup(attester._tpm.tss.TPM2_SU.CLEAR)  # what the platform does after TPM_Init
    # The saved key contexts no longer load after a TPM Reset; the same keys are derived again.
    evidence = attester.collect(report_data)
    assert evidence.parts["ak"] == ak_public
    claims = TpmVerifier().verify(evidence, report_data=report_data, now=datetime.now(UTC))
    assert claims.registers["pcr.sha384.15"] == bytes(48)
    credential = make_credential(attester.ek_public, attester.ak_name, b"after reset")
    assert attester.activate_credential(*credential) == b"after reset"


def test_a_changed_endorsement_seed_is_an_error(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    tpm = start_swtpm()
    attester = open_attester(tpm)
    tpm.init()
    attester._tpm.esys.startup(attester._tpm.tss.TPM2_SU.CLEAR)
    attester._tpm.esys.change_eps()  # a new endorsement primary seed, as re-provisioning the TPM gives
    with pytest.raises(TpmDeviceError, match="re-created AK differs from the original"):
        attester.collect(os.urandom(64))


def test_every_transient_handle_is_flushed(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    from enclave.attestation.tpm_credential import make_credential

    tpm_support.require_tpm2_tools()
    tpm = start_swtpm()
    enclave = measured(open_attester(tpm))
    enclave.evidence()
    blob, secret = make_credential(enclave.attester.ek_public, enclave.attester.ak_name, b"s" * 32)
    assert enclave.attester.activate_credential(blob, secret) == b"s" * 32
    enclave.attester.close()  # swtpm serves one connection at a time
    for capability in ("handles-transient", "handles-loaded-session", "handles-saved-session"):
        listed = subprocess.run(
            ["tpm2_getcap", capability], env=tpm.tools_env(), capture_output=True, text=True, check=True
        )
        assert listed.stdout.strip() == "", f"{capability}: {listed.stdout}"


def test_unreachable_tpm_is_a_clear_error() -> None:
    tpm_support.require_tpm2_pytss()
    with pytest.raises(
        TpmDeviceError, match=re.escape("cannot open the TPM through TCTI 'swtpm:host=127.0.0.1,port=1'")
    ):
        TpmAttester("swtpm:host=127.0.0.1,port=1")


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"key_type": "dsa"}, id="key-type"),
        pytest.param({"app_pcr": 16}, id="debug-pcr-is-resettable"),
        pytest.param({"app_pcr": 23}, id="application-pcr-23-is-resettable"),
        pytest.param({"app_pcr": 24}, id="app-pcr-out-of-range"),
        pytest.param({"app_pcr": -1}, id="app-pcr-negative"),
        pytest.param({"quote_pcrs": [0, 24]}, id="quoted-pcr-out-of-range"),
    ],
)
def test_refuses_options_before_touching_a_tpm(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is checked by the CLI's tests
        TpmAttester("swtpm:host=127.0.0.1,port=1", **options)


def test_collect_and_extend_check_their_arguments(open_attester: OpenAttester) -> None:
    attester = open_attester()
    with pytest.raises(ValueError, match="report data must be 64 bytes"):
        attester.collect(b"short")
    with pytest.raises(ValueError, match="no sha384 digest"):
        attester.extend({"sha256": bytes(32)})
    with pytest.raises(ValueError, match="sha256 digest is 31 bytes"):
        attester.extend({"sha384": bytes(48), "sha256": bytes(31)})


@pytest.mark.parametrize(
    ("text", "pcrs"),
    [("", ()), ("0-7", tuple(range(8))), ("0,2,4-5", (0, 2, 4, 5)), (" 7 , 0-1 ", (0, 1, 7)), ("23", (23,))],
)
def test_parse_pcr_list(text: str, pcrs: tuple[int, ...]) -> None:
    assert parse_pcr_list(text) == pcrs


@pytest.mark.parametrize("text", ["a", "7-3", "0-24", "1-", "-1", "0x1"])
def test_parse_pcr_list_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="PCR"):
        parse_pcr_list(text)
