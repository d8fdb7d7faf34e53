"""Tampered real quotes and collateral: every signed region, the root, the CRLs, the JSON text.

The genuine files are in ../shared/vectors (see MANIFEST.md); each test
changes one thing and checks that verification refuses it for that reason.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave.attestation.dcap import parse_quote, verify_quote
from enclave.attestation.dcap_pck import load_certificate_chain_pem
from enclave.errors import EvidenceError

from .test_dcap_vectors import INTEL, at, collateral_for, vector

QUOTE = "tdx/dcapqvl_tdx_quote.bin"
NOW = at("2025-06-20")


def _flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1 :]


def _offsets(raw: bytes) -> dict[str, int]:
    """An offset inside each region of the quote, found from the parsed quote."""
    quote = parse_quote(raw)
    qe_report = raw.index(quote.qe_report_bytes)
    pem = raw.index(quote.pck_chain_pem)
    leaf_end = raw.index(b"-----END CERTIFICATE-----", pem)
    return {
        "header user data": 30,
        "body MRTD": 48 + 200,
        "body REPORTDATA": len(quote.signed_bytes) - 1,
        "quote signature": raw.index(quote.signature) + 40,
        "attestation key": raw.index(quote.attestation_key) + 10,
        "QE report": qe_report + 100,
        "QE report data": qe_report + 320 + 5,
        "QE report signature": raw.index(quote.qe_report_signature) + 3,
        "QE auth data": raw.index(quote.qe_auth_data, qe_report + 384) + 1,
        "PCK leaf signature (base64)": leaf_end - 10,
    }


EXPECTED = {
    "header user data": "quote signature",
    "body MRTD": "quote signature",
    "body REPORTDATA": "quote signature",
    "quote signature": "quote signature",
    "attestation key": "QE report data is not sha256",
    "QE report": "QE report signature",
    "QE report data": "QE report signature",
    "QE report signature": "QE report signature",
    "QE auth data": "QE report data is not sha256",
    "PCK leaf signature (base64)": "PCK certificate",
}


def test_genuine_quote_passes_first() -> None:
    assert (
        verify_quote(vector(QUOTE), now=NOW, collateral=collateral_for("dcapqvl-tdx")).tcb_status
        == "UpToDate"
    )


@pytest.mark.parametrize("region", sorted(EXPECTED))
def test_a_flipped_byte_in_each_signed_region_is_refused(region: str) -> None:
    raw = vector(QUOTE)
    offset = _offsets(raw)[region]
    mask = 0x01 if region != "PCK leaf signature (base64)" else 0x02  # stays a base64 letter
    with pytest.raises(EvidenceError, match=EXPECTED[region]):
        verify_quote(_flip(raw, offset, mask), now=NOW)


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_flipped_byte_before_the_pck_chain_is_refused(data: st.DataObject) -> None:
    raw = vector(QUOTE)
    end = raw.index(parse_quote(raw).pck_chain_pem)
    offset = data.draw(st.integers(0, end - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(EvidenceError):
        verify_quote(_flip(raw, offset, mask), now=NOW)


def _self_signed(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2040, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def test_another_root_is_refused() -> None:
    root, _ = _self_signed("Intel SGX Root CA")  # same name, other key
    with pytest.raises(EvidenceError, match="not the trusted root"):
        verify_quote(vector(QUOTE), now=NOW, trust_anchor=root.public_bytes(serialization.Encoding.DER))


def test_the_intel_root_may_be_passed_as_pem() -> None:
    anchor = vector(f"{INTEL}/gotdx_trusted_root.pem")
    assert verify_quote(vector(QUOTE), now=NOW, trust_anchor=anchor).checks_done[0] == "pck_chain"


def test_a_crl_revoking_the_real_pck_but_not_signed_by_intel_is_refused() -> None:
    raw = vector(QUOTE)
    leaf, ca = load_certificate_chain_pem(parse_quote(raw).pck_chain_pem, "chain")[:2]
    key = ec.generate_private_key(ec.SECP256R1())
    fake = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(NOW - timedelta(days=1))
        .next_update(NOW + timedelta(days=29))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(leaf.serial_number).revocation_date(NOW).build()
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    with pytest.raises(EvidenceError, match="pck_crl signature does not verify"):
        verify_quote(raw, now=NOW, collateral={"pck_crl": fake})


def test_the_real_pck_crl_does_not_list_the_real_pck() -> None:
    pck_crl = bytes.fromhex(json.loads(vector("tdx/dcapqvl_tdx_quote_collateral.json"))["pck_crl"])
    result = verify_quote(vector(QUOTE), now=NOW, collateral={"pck_crl": pck_crl})
    assert "pck_crl" in result.checks_done


def test_a_pck_crl_in_the_root_crl_slot_is_refused() -> None:
    pck_crl = bytes.fromhex(json.loads(vector("tdx/dcapqvl_tdx_quote_collateral.json"))["pck_crl"])
    with pytest.raises(EvidenceError, match=r"root_ca_crl is issued by .*PCK Platform CA"):
        verify_quote(vector(QUOTE), now=NOW, collateral={"root_ca_crl": pck_crl})


def test_tcb_info_for_another_fmspc_is_refused() -> None:
    collateral = {
        "tcb_info": vector(f"{INTEL}/automata_0625_tcbinfov3_00806f050000.json"),  # fresh on 2025-06-20
        "tcb_info_issuer_chain": vector(f"{INTEL}/derived_intel_sgx_tcb_signing_chain.pem"),
    }
    with pytest.raises(
        EvidenceError, match="tcb_info is for FMSPC 00806f050000, the PCK certificate has b0c06f000000"
    ):
        verify_quote(vector(QUOTE), now=NOW, collateral=collateral)


def test_sgx_qe_identity_for_a_tdx_quote_is_refused() -> None:
    sgx = json.loads(vector("sgx/dcapqvl_sgx_quote_collateral.json"))
    collateral = {
        "qe_identity": b'{"enclaveIdentity":'
        + sgx["qe_identity"].encode()
        + b',"signature":"'
        + sgx["qe_identity_signature"].encode()
        + b'"}',
        "qe_identity_issuer_chain": sgx["qe_identity_issuer_chain"].encode(),
    }
    with pytest.raises(EvidenceError, match="needs 'TD_QE'"):
        verify_quote(vector(QUOTE), now=NOW, collateral=collateral)


def test_collateral_is_expired_at_a_later_time() -> None:
    with pytest.raises(EvidenceError, match=r"expired at 2025-07-19"):
        verify_quote(vector(QUOTE), now=at("2025-08-01"), collateral=collateral_for("dcapqvl-tdx"))
    result = verify_quote(
        vector(QUOTE),
        now=at("2025-08-01"),
        collateral=collateral_for("dcapqvl-tdx"),
        accept_expired_collateral=True,
    )
    assert result.tcb_status == "UpToDate"
    assert len(result.warnings) == 3  # PCK CRL, TCB info, QE identity; the Root CA CRL runs to 2026-04


def _trustee_collateral(tcb_info: bytes) -> dict[str, bytes]:
    chain = vector(f"{INTEL}/derived_intel_sgx_tcb_signing_chain.pem")
    return {"tcb_info": tcb_info, "tcb_info_issuer_chain": chain}


def test_signature_covers_the_exact_json_text() -> None:
    raw = vector("tdx/trustee_tdx_quote_6.dat")
    genuine = vector("tdx/trustee_tcbInfo.json")
    now = at("2025-10-29")
    assert verify_quote(raw, now=now, collateral=_trustee_collateral(genuine)).tcb_status == "OutOfDate"
    doc = json.loads(genuine)
    reserialized = json.dumps({"tcbInfo": doc["tcbInfo"], "signature": doc["signature"]}, indent=1).encode()
    with pytest.raises(EvidenceError, match="tcb_info signature does not verify"):
        verify_quote(raw, now=now, collateral=_trustee_collateral(reserialized))
    edited = genuine.replace(b'"tcbStatus":"OutOfDate"', b'"tcbStatus":"UpToDate"', 1)
    assert edited != genuine
    with pytest.raises(EvidenceError, match="tcb_info signature does not verify"):
        verify_quote(raw, now=now, collateral=_trustee_collateral(edited))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(b'{"tcbInfo":{},"signature":"00","x":1}', "must hold exactly", id="extra-member"),
        pytest.param(b'{"tcbInfo":{},"tcbInfo":{},"signature":"00"}', "repeated", id="duplicate"),
        pytest.param(b'{"tcbInfo":{},"signature":"00"} trailing', "text after", id="trailing-text"),
        pytest.param(b'{"tcbInfo":{},"signature":"zz"}', "not hex", id="signature-not-hex"),
        pytest.param(b'{"tcbInfo":{},"signature":"00"}', "expected 64", id="signature-short"),
        pytest.param(b"[1]", "not a JSON object", id="array"),
        pytest.param(b"\xff\xfe", "not UTF-8", id="not-utf8"),
    ],
)
def test_malformed_pcs_responses_are_refused(text: bytes, message: str) -> None:
    with pytest.raises(EvidenceError, match=message):
        verify_quote(vector(QUOTE), now=NOW, collateral=_trustee_collateral(text))
