"""SEV-SNP verification against the real AMD evidence in ../shared/vectors.

Provenance of every file: ../shared/vectors/MANIFEST.md (go-sev-guest, trustee
and virtee/sev test data, real Milan hardware and Azure CVMs). Expected parsed
values: ../shared/vectors/expected_values.json (an independent parser).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave.attestation.interface import Evidence
from enclave.attestation.sev_snp import (
    ARK_SHA256,
    SevSnpVerifier,
    VerifiedReport,
    check_chip_id,
    check_reported_tcb,
    verify_report,
)
from enclave.attestation.sev_snp_certs import EndorsementKey, endorsement_key
from enclave.attestation.sev_snp_report import Product, SigningKey, TcbVersion, parse_report
from enclave.errors import BindingError, EvidenceError

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
NOW = datetime.datetime(2026, 11, 21, tzinfo=datetime.UTC)
MILAN_CHAIN = "sev-snp/trustee_milan_ask_ark_asvk.pem"


def _read(name: str) -> bytes:
    path = VECTORS / name
    if not path.is_file():
        pytest.fail(f"SEV-SNP test vector {path} is missing: check out ../shared/vectors next to the repo")
    return path.read_bytes()


# (id, file, offset of the report in it, signing certificate, chain); the first
# three are in expected_values.json under the same file name.
SAMPLES = [
    ("trustee", "sev-snp/trustee_test-report.bin", 0, "sev-snp/trustee_test-vcek.der", MILAN_CHAIN),
    (
        "gosev",
        "sev-snp/gosev_attestation.bin",
        0,
        "sev-snp/gosev_vcek.testcer.der",
        "sev-snp/gosev_milan_ask_ark.pem",
    ),
    (
        "azure-hcl",
        "az-vtpm/trustee_az-snp-vtpm_hcl-report.bin",
        32,
        "az-vtpm/trustee_az-snp-vtpm_vcek.pem",
        MILAN_CHAIN,
    ),
]


def _sample(file: str, offset: int) -> bytes:
    return _read(file)[offset : offset + 1184]


def _verify(report: bytes, vcek: bytes, chain: bytes | None, **kw: Any) -> VerifiedReport:
    return verify_report(report, vcek, chain, now=kw.pop("now", NOW), **kw)


def _trustee() -> tuple[bytes, bytes, bytes]:
    return (
        _read("sev-snp/trustee_test-report.bin"),
        _read("sev-snp/trustee_test-vcek.der"),
        _read(MILAN_CHAIN),
    )


def _tcb_dict(tcb: TcbVersion) -> dict[str, Any]:
    return {
        "bootloader": tcb.bootloader,
        "tee": tcb.tee,
        "snp": tcb.snp,
        "microcode": tcb.microcode,
        "raw": f"{tcb.raw:#x}",
    }


@pytest.mark.parametrize(
    ("file", "offset", "vcek", "chain"), [s[1:] for s in SAMPLES], ids=[s[0] for s in SAMPLES]
)
def test_real_report_verifies_and_parses_to_the_expected_values(
    file: str, offset: int, vcek: str, chain: str
) -> None:
    expected = json.loads(_read("expected_values.json"))["sev-snp"][file]
    assert (expected["report_offset_in_file"], expected["signing_cert"]) == (offset, vcek)
    verified = _verify(_sample(file, offset), _read(vcek), _read(chain))
    r = verified.report
    assert verified.product is Product.MILAN
    assert verified.endorsement.kind is SigningKey.VCEK
    milan = Product.MILAN
    actual = {
        "version": r.version,
        "guest_svn": r.guest_svn,
        "policy": f"{r.policy.raw:#x}",
        "family_id": r.family_id.hex(),
        "image_id": r.image_id.hex(),
        "vmpl": r.vmpl,
        "signature_algo": r.signature_algo,
        "current_tcb": _tcb_dict(TcbVersion.decode(r.current_tcb, milan)),
        "platform_info": f"{r.platform_info:#x}",
        "key_info": r.key_info,
        "mask_chip_key": int(r.mask_chip_key),
        "signing_key": r.signing_key.name,
        "report_data": r.report_data.hex(),
        "measurement": r.measurement.hex(),
        "host_data": r.host_data.hex(),
        "id_key_digest": r.id_key_digest.hex(),
        "author_key_digest": r.author_key_digest.hex(),
        "report_id": r.report_id.hex(),
        "report_id_ma": r.report_id_ma.hex(),
        "reported_tcb": _tcb_dict(verified.reported_tcb),
        "cpuid_fam_id": r.cpuid_fam_id,
        "cpuid_mod_id": r.cpuid_mod_id,
        "cpuid_step": r.cpuid_step,
        "chip_id": r.chip_id.hex(),
        "committed_tcb": _tcb_dict(TcbVersion.decode(r.committed_tcb, milan)),
        "current_build": r.current_build,
        "current_minor": r.current_minor,
        "current_major": r.current_major,
        "committed_build": r.committed_build,
        "committed_minor": r.committed_minor,
        "committed_major": r.committed_major,
        "launch_tcb": _tcb_dict(TcbVersion.decode(r.launch_tcb, milan)),
    }
    for key in ("ca_chain", "signing_cert", "report_offset_in_file"):
        expected.pop(key)
    assert actual == expected


def test_hcl_report_verifies_with_the_chain_bundled_in_its_vcek_pem() -> None:
    verified = _verify(_sample(SAMPLES[2][1], 32), _read(SAMPLES[2][3]), None)
    assert verified.report.guest_svn == 5


def _azure_bundles() -> list[tuple[str, bytes, bytes]]:
    """The version 3 reports inside trustee's Azure evidence bundles (Milan, two VMs)."""

    def b64url(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    out = []
    v0 = json.loads(_read("az-vtpm/trustee_az-snp-vtpm_evidence-v0.json"))
    out.append(("v0", bytes(v0["report"])[32 : 32 + 1184], v0["vcek"].encode()))
    for v in ("v1", "v2"):
        doc = json.loads(_read(f"az-vtpm/trustee_az-snp-vtpm_evidence-{v}.json"))
        out.append((v, b64url(doc["hcl_report"])[32 : 32 + 1184], b64url(doc["vcek"])))
    return out


def test_version_3_reports_in_the_azure_bundles_verify() -> None:
    for name, report, vcek in _azure_bundles():
        verified = _verify(report, vcek, _read(MILAN_CHAIN))
        r = verified.report
        assert (r.version, r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step) == (3, 0x19, 0x01, 0x01), name
        # The VCEK (not our parser) says bl 4, tee 0, snp 24, ucode 219, and the binding held.
        assert verified.reported_tcb.components() == {"bootloader": 4, "tee": 0, "snp": 24, "microcode": 219}
        assert dict(verified.endorsement.tcb) == verified.reported_tcb.components()


def test_pinned_ark_fingerprints_match_every_ark_in_the_vectors() -> None:
    manifest = _read("MANIFEST.md").decode()
    for product, fingerprint in ARK_SHA256.items():
        assert re.search(rf"ARK-{product.value} (sha256\(DER\) )?{fingerprint[:16]}\.\.", manifest)
    seen = set()
    for pem in sorted([*VECTORS.glob("sev-snp/*.pem"), *VECTORS.glob("az-vtpm/*.pem")]):
        with warnings.catch_warnings():  # the az bundle holds a serial-0 VCEK; only ARKs matter here
            warnings.simplefilter("ignore")
            certs = x509.load_pem_x509_certificates(pem.read_bytes())
        for cert in certs:
            cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            if str(cn).startswith("ARK-"):
                product = Product(str(cn).removeprefix("ARK-"))
                assert hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest() == ARK_SHA256[product]
                seen.add(product)
    assert seen == set(Product)


@pytest.mark.parametrize(
    ("vcek", "chain", "product", "tcb"),
    [
        (
            "az-vtpm/trustee_az-snp-vtpm_vcek-genoa.pem",
            "sev-snp/trustee_genoa_ask_ark_asvk.pem",
            "Genoa",
            [10, 0, 0, 0, 0, 0, 23, 84],
        ),
        (
            "sev-snp/virtee_vcek_turin.der",
            "sev-snp/virtee_cert_chain_turin.pem",
            "Turin",
            [0, 0, 0, 0, 0, 0, 0, 9],
        ),
    ],
    ids=["genoa", "turin"],
)
def test_real_genoa_and_turin_vceks_chain_to_the_pinned_arks(
    vcek: str, chain: str, product: str, tcb: list[int]
) -> None:
    """No Genoa or Turin report is in the vectors: a Milan report re-labelled with the VCEK's
    chip and TCB passes the chain and both bindings, so only its signature is refused."""
    key = _load_key(_read(vcek))
    assert key.product_name == product
    assert key.hwid is not None
    assert len(key.hwid) == (8 if product == "Turin" else 64)
    assert TcbVersion.decode(int.from_bytes(bytes(tcb), "little"), Product(product)).components() == dict(
        key.tcb
    )
    report = _read("sev-snp/trustee_test-report.bin")
    report = report[:0x180] + bytes(tcb) + report[0x188:0x1A0] + key.hwid.ljust(64, b"\0") + report[0x1E0:]
    with pytest.raises(EvidenceError, match="SEV-SNP report SIGNATURE does not verify with the VCEK"):
        _verify(report, _read(vcek), _read(chain), product=Product(product))


@pytest.mark.parametrize("name", ["legacy", "new"])
def test_invalid_trustee_vceks_are_refused(name: str) -> None:
    """NEGATIVE/synthetic VCEKs (fake hwID 00..3f): not signed by AMD, and for no real chip."""
    report, _, chain = _trustee()
    bad = _read(f"sev-snp/trustee_test-vcek-invalid-{name}.der")
    with pytest.raises(EvidenceError, match="VCEK signature does not verify with SEV-Milan"):
        _verify(report, bad, chain)
    key = _load_key(bad)
    assert key.hwid == bytes(range(64))  # both the raw and the OCTET STRING encodings
    with pytest.raises(EvidenceError, match=r"CHIP_ID .* does not match the VCEK hwID"):
        check_chip_id(parse_report(report), key, Product.MILAN)


def _load_key(data: bytes) -> EndorsementKey:
    """A VCEK's extensions, read without the chain (AMD VCEKs have serial 0, hence the filter)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Parsed a serial number", category=CryptographyDeprecationWarning
        )
        pem = data.startswith(b"-----")
        cert = x509.load_pem_x509_certificate(data) if pem else x509.load_der_x509_certificate(data)
    return endorsement_key(cert, SigningKey.VCEK)


def _flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1 :]


@settings(max_examples=40, deadline=None)
@given(offset=st.integers(0, 0x29F), mask=st.integers(1, 255))
def test_any_flipped_byte_in_the_signed_region_is_refused(offset: int, mask: int) -> None:
    report, vcek, chain = _trustee()
    with pytest.raises(EvidenceError):
        _verify(_flip(report, offset, mask), vcek, chain)


@pytest.mark.parametrize(
    ("offset", "field"),
    [
        (0x090, "MEASUREMENT"),
        (0x050, "REPORT_DATA"),
        (0x0C0, "HOST_DATA"),
        (0x004, "GUEST_SVN"),
        (0x008, "POLICY"),
    ],
)
def test_flipped_field_breaks_the_signature(offset: int, field: str) -> None:
    report, vcek, chain = _trustee()
    with pytest.raises(EvidenceError, match="SIGNATURE does not verify with the VCEK"):
        _verify(_flip(report, offset), vcek, chain)


@pytest.mark.parametrize(
    "offset", [0x2A0, 0x2A0 + 71, 0x2A0 + 72, 0x2A0 + 143], ids=["R0", "R71", "S0", "S71"]
)
def test_flipped_signature_byte_is_refused(offset: int) -> None:
    report, vcek, chain = _trustee()
    with pytest.raises(EvidenceError, match="SIGNATURE does not verify"):
        _verify(_flip(report, offset), vcek, chain)


def test_flipped_reserved_signature_byte_is_refused_by_the_parser() -> None:
    report, vcek, chain = _trustee()
    with pytest.raises(EvidenceError, match="SIGNATURE has non-zero reserved bytes"):
        _verify(_flip(report, 0x2A0 + 200), vcek, chain)


def test_wrong_ark_in_the_chain_is_refused() -> None:
    report, vcek, _ = _trustee()
    genoa = x509.load_pem_x509_certificates(_read("sev-snp/trustee_genoa_ask_ark_asvk.pem"))
    milan_ask = _read("sev-snp/virtee_builtin_milan_ask.pem")
    genoa_ark = next(c for c in genoa if "ARK-Genoa" in c.subject.rfc4514_string())
    with pytest.raises(EvidenceError, match="lacks the ARK that issued 'SEV-Milan'"):
        _verify(report, vcek, milan_ask + genoa_ark.public_bytes(Encoding.PEM))


def test_milan_chain_is_refused_when_only_the_genoa_ark_is_trusted() -> None:
    report, vcek, chain = _trustee()
    with pytest.raises(EvidenceError, match=r"ARK-Milan .* is not a trusted AMD root"):
        _verify(report, vcek, chain, roots=[_read("sev-snp/virtee_builtin_genoa_ark.pem")])
    assert _verify(report, vcek, chain, roots=[_read("sev-snp/virtee_builtin_milan_ark.pem")])
    # The root may also come only from the caller: the chain then needs just the ASK.
    assert _verify(
        report,
        vcek,
        _read("sev-snp/virtee_builtin_milan_ask.pem"),
        roots=[_read("sev-snp/virtee_builtin_milan_ark.pem")],
    )


def test_roots_must_be_arks_and_not_empty() -> None:
    report, vcek, chain = _trustee()
    with pytest.raises(ValueError, match="empty list of trusted roots"):
        _verify(report, vcek, chain, roots=[])
    with pytest.raises(ValueError, match="'SEV-Milan' is not a self-issued AMD ARK"):
        _verify(report, vcek, chain, roots=[_read("sev-snp/virtee_builtin_milan_ask.pem")])


def test_chain_without_the_ask_is_refused() -> None:
    report, vcek, _ = _trustee()
    with pytest.raises(EvidenceError, match="lacks the ASK"):
        _verify(report, vcek, _read("sev-snp/virtee_builtin_milan_ark.pem"))


def test_product_constraint_is_enforced() -> None:
    report, vcek, chain = _trustee()
    with pytest.raises(EvidenceError, match="chain is for Milan, expected Genoa"):
        _verify(report, vcek, chain, product=Product.GENOA)
    assert _verify(report, vcek, chain, product=Product.MILAN).product is Product.MILAN


def test_vcek_for_another_chip_is_refused_naming_chip_id() -> None:
    report, vcek, chain = _trustee()
    mutated = _flip(report, 0x1A0 + 5)
    with pytest.raises(EvidenceError, match=r"CHIP_ID .* does not match the VCEK hwID"):
        _verify(mutated, vcek, chain)
    # The gosev VCEK is for another chip: the binding, not just the signature, refuses it.
    with pytest.raises(EvidenceError, match="CHIP_ID"):
        _verify(report, _read("sev-snp/gosev_vcek.testcer.der"), _read("sev-snp/gosev_milan_ask_ark.pem"))


def test_chip_id_binding_on_parsed_values() -> None:
    report, vcek, _ = _trustee()
    parsed = parse_report(report)
    key = _load_key(vcek)
    assert check_chip_id(parsed, key, Product.MILAN) == "CHIP_ID equals the VCEK hwID"
    other = dataclasses.replace(parsed, chip_id=bytes([parsed.chip_id[0] ^ 1]) + parsed.chip_id[1:])
    with pytest.raises(EvidenceError, match="CHIP_ID"):
        check_chip_id(other, key, Product.MILAN)
    masked = dataclasses.replace(parsed, chip_id=bytes(64))
    assert "MaskChipId" in check_chip_id(masked, key, Product.MILAN)
    with pytest.raises(EvidenceError, match="lacks the hwID extension"):
        check_chip_id(parsed, dataclasses.replace(key, hwid=None), Product.MILAN)


def test_reported_tcb_mismatch_is_refused_naming_reported_tcb() -> None:
    report, vcek, chain = _trustee()
    mutated = report[:0x180] + (0x7309000000000003).to_bytes(8, "little") + report[0x188:]  # snp 8 -> 9
    with pytest.raises(
        EvidenceError, match="REPORTED_TCB 0x7309000000000003 does not match the VCEK TCB: snp 9 vs VCEK 8"
    ):
        _verify(mutated, vcek, chain)


def test_reported_tcb_binding_on_parsed_values() -> None:
    report, vcek, _ = _trustee()
    parsed = parse_report(report)
    key = _load_key(vcek)
    assert "equals the VCEK TCB" in check_reported_tcb(parsed, key, Product.MILAN)
    for raw, needle in [
        (0x7308000000000004, "bootloader 4 vs VCEK 3"),
        (0x7308000000000103, "tee 1 vs VCEK 0"),
        (0x7408000000000003, "microcode 116 vs VCEK 115"),
    ]:
        with pytest.raises(EvidenceError, match=needle):
            check_reported_tcb(dataclasses.replace(parsed, reported_tcb=raw), key, Product.MILAN)
    # Read with the Turin layout the same bytes name other components, and the VCEK has no FMC.
    with pytest.raises(EvidenceError, match="lacks the fmc TCB extension"):
        check_reported_tcb(parsed, key, Product.TURIN)


@pytest.mark.parametrize(
    ("now", "needle"),
    [
        (
            datetime.datetime(2030, 1, 24, 17, 58, 27, tzinfo=datetime.UTC),
            "VCEK certificate is not valid at 2030-01-24",
        ),
        (
            datetime.datetime(2023, 1, 24, 17, 58, 25, tzinfo=datetime.UTC),
            "VCEK certificate is not valid at 2023-01-24",
        ),
        (datetime.datetime(2045, 10, 22, 18, 0, tzinfo=datetime.UTC), "ARK-Milan certificate is not valid"),
    ],
    ids=["after-vcek-notAfter", "before-vcek-notBefore", "after-ark-notAfter"],
)
def test_certificates_are_judged_at_now(now: datetime.datetime, needle: str) -> None:
    report, vcek, chain = _trustee()
    with pytest.raises(EvidenceError, match=needle):
        _verify(report, vcek, chain, now=now)
    _verify(report, vcek, chain, now=datetime.datetime(2030, 1, 24, 17, 58, 26, tzinfo=datetime.UTC))


def test_naive_now_is_a_usage_error() -> None:
    report, vcek, chain = _trustee()
    with pytest.raises(ValueError, match="timezone-aware"):
        _verify(report, vcek, chain, now=datetime.datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("vcek", "needle"),
    [
        (b"", "does not parse"),
        (b"not a certificate", "does not parse"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "does not parse"),
        (b"\x30" * (64 * 1024 + 1), "over the 65536-byte limit"),
    ],
    ids=["empty", "garbage", "bad-pem", "oversized"],
)
def test_malformed_vcek_is_an_evidence_error(vcek: bytes, needle: str) -> None:
    report, _, chain = _trustee()
    with pytest.raises(EvidenceError, match=needle):
        _verify(report, vcek, chain)


def test_ask_in_the_vcek_slot_is_refused() -> None:
    report, _, chain = _trustee()
    with pytest.raises(EvidenceError, match="KEY_INFO says VCEK but the certificate is 'SEV-Milan'"):
        _verify(report, _read("sev-snp/virtee_builtin_milan_ask.pem"), chain)


def test_warning_filters_are_left_as_they_were() -> None:
    before = list(warnings.filters)
    _verify(*_trustee())
    assert warnings.filters == before


@settings(max_examples=30, deadline=None)
@given(vcek=st.binary(max_size=2048))
def test_random_vcek_bytes_raise_only_evidence_error(vcek: bytes) -> None:
    report, _, chain = _trustee()
    with pytest.raises(EvidenceError):
        _verify(report, vcek, chain)


# --- the Verifier interface ---------------------------------------------------------------------


def _evidence(**parts: bytes) -> Evidence:
    report, vcek, _ = _trustee()
    return Evidence(platform="sev-snp", parts={"report": report, "vcek": vcek, **parts})


def test_verifier_returns_platform_claims() -> None:
    report, _, chain = _trustee()
    parsed = parse_report(report)
    evidence = Evidence.from_bytes(_evidence().to_bytes())
    claims = SevSnpVerifier().verify(
        evidence, report_data=parsed.report_data, now=NOW, collateral={"cert_chain": chain}
    )
    assert claims.platform == "sev-snp"
    assert claims.simulated is False
    assert claims.log_register is None
    assert claims.report_data == parsed.report_data
    assert claims.registers["measurement"].hex().startswith("a1f3930413247bb3")
    assert claims.registers["host_data"] == bytes(32)
    assert claims.registers["id_key_digest"] == parsed.id_key_digest
    assert claims.registers["report_data"] == parsed.report_data
    d = claims.details
    assert d["signing_key"] == "VCEK"
    assert d["product"] == "Milan"
    assert d["chip_id"] == parsed.chip_id.hex()
    assert d["reported_tcb"] == {
        "raw": "0x7308000000000003",
        "bootloader": 3,
        "tee": 0,
        "snp": 8,
        "microcode": 115,
    }
    assert (d["policy"]["smt"], d["policy"]["debug"], d["policy"]["migrate_ma"]) == (True, False, False)
    assert d["platform_info"]["smt_enabled"] is True
    assert d["current_version"] == "1.52.4"
    assert any("REPORTED_TCB" in c for c in d["checks"])


def test_verifier_takes_vcek_and_chain_from_wherever_they_come() -> None:
    report, vcek, chain = _trustee()
    rd = parse_report(report).report_data
    only_report = Evidence(platform="sev-snp", parts={"report": report})
    SevSnpVerifier().verify(
        only_report, report_data=rd, now=NOW, collateral={"vcek": vcek, "cert_chain": chain}
    )
    SevSnpVerifier().verify(_evidence(cert_chain=chain), report_data=rd, now=NOW)
    with pytest.raises(EvidenceError, match="lacks its 'vcek' part"):
        SevSnpVerifier().verify(only_report, report_data=rd, now=NOW, collateral={"cert_chain": chain})
    with pytest.raises(EvidenceError, match="lacks its 'report' part"):
        SevSnpVerifier().verify(
            Evidence(platform="sev-snp", parts={"vcek": vcek}),
            report_data=rd,
            now=NOW,
            collateral={"cert_chain": chain},
        )
    with pytest.raises(EvidenceError, match="lacks the ASK"):
        SevSnpVerifier().verify(_evidence(), report_data=rd, now=NOW)


def test_verifier_refuses_other_report_data_with_a_binding_error() -> None:
    _, _, chain = _trustee()
    with pytest.raises(BindingError, match="REPORT_DATA"):
        SevSnpVerifier().verify(_evidence(), report_data=bytes(64), now=NOW, collateral={"cert_chain": chain})


def test_verifier_refuses_other_platforms_and_other_products() -> None:
    report, _, chain = _trustee()
    rd = parse_report(report).report_data
    with pytest.raises(EvidenceError, match="expected sev-snp evidence"):
        SevSnpVerifier().verify(Evidence(platform="sim", parts={}), report_data=rd, now=NOW)
    with pytest.raises(EvidenceError, match="expected Turin"):
        SevSnpVerifier(product=Product.TURIN).verify(
            _evidence(), report_data=rd, now=NOW, collateral={"cert_chain": chain}
        )
