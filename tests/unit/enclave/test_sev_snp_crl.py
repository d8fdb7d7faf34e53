"""The ARK-signed AMD CRL in SEV-SNP verification: signature, issuer, freshness, revoked serials.

../shared/vectors/sev-snp holds no AMD CRL, so each CRL here is signed by the
synthetic ARK of test_sev_snp_synthetic (RSA-PSS SHA-384, salt 48, as AMD
signs it). The real chains in the vectors still verify, and name revocation
as not checked when no CRL is given.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from enclave.attestation import Evidence
from enclave.attestation.sev_snp import SevSnpVerifier, verify_report
from enclave.attestation.sev_snp_crl import MAX_CRL_BYTES
from enclave.attestation.sev_snp_report import SigningKey
from enclave.errors import EvidenceError
from tests.unit.enclave.test_sev_snp_synthetic import NOW, PSS, Fake, _fake, _pem, _report, _rsa

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors" / "sev-snp"
DAY = datetime.timedelta(days=1)
SHA384 = hashes.SHA384()


def _crl(
    fake: Fake,
    *,
    revoked: tuple[x509.Certificate, ...] = (),
    this_update: datetime.datetime = NOW - DAY,
    next_update: datetime.datetime = NOW + 7 * DAY,
    signer: rsa.RSAPrivateKey | None = None,
    issuer: x509.Name | None = None,
    rsa_padding: padding.PSS | padding.PKCS1v15 = PSS,
    digest: hashes.HashAlgorithm = SHA384,
) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer or fake.ark.subject)
        .last_update(this_update)
        .next_update(next_update)
    )
    for cert in revoked:
        entry = (
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(NOW - 2 * DAY)
        )
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(signer or _rsa("ark"), digest, rsa_padding=rsa_padding)
    return crl.public_bytes(Encoding.DER)


def _verify(fake: Fake, crl: bytes, *, now: datetime.datetime = NOW) -> list[str]:
    verified = verify_report(_report(fake), _pem(fake.leaf), fake.chain, now=now, roots=fake.roots, crl=crl)
    assert verified.crl_checked
    assert "revocation" not in verified.not_checked()
    return list(verified.checks)


@pytest.mark.parametrize("kind", [SigningKey.VCEK, SigningKey.VLEK])
def test_a_current_crl_signed_by_the_ark_that_lists_other_serials_passes(kind: SigningKey) -> None:
    fake = _fake(kind=kind)
    bystander = _fake(kind=SigningKey.VLEK if kind is SigningKey.VCEK else SigningKey.VCEK).middle
    checks = _verify(fake, _crl(fake, revoked=(bystander,)))
    assert any(c.startswith("AMD CRL signed by ARK-Milan") and "not revoked" in c for c in checks)


def test_a_pem_crl_is_read_too() -> None:
    fake = _fake()
    pem = x509.load_der_x509_crl(_crl(fake)).public_bytes(Encoding.PEM)
    _verify(fake, pem)


@pytest.mark.parametrize(("which", "label"), [("middle", "SEV-Milan"), ("leaf", "VCEK")], ids=["ask", "vcek"])
def test_a_revoked_ask_or_vcek_is_refused(which: str, label: str) -> None:
    fake = _fake()
    revoked = getattr(fake, which)
    with pytest.raises(
        EvidenceError, match=rf"{label} \(serial {revoked.serial_number}\) is revoked by ARK-Milan"
    ):
        _verify(fake, _crl(fake, revoked=(revoked,)))


def test_a_revoked_asvk_is_refused() -> None:
    fake = _fake(kind=SigningKey.VLEK)
    with pytest.raises(EvidenceError, match=r"SEV-VLEK-Milan .* is revoked"):
        _verify(fake, _crl(fake, revoked=(fake.middle,)))


@pytest.mark.parametrize(
    ("crl_args", "now", "message"),
    [
        ({"next_update": NOW - DAY, "this_update": NOW - 8 * DAY}, NOW, "AMD CRL is stale"),
        ({}, NOW + 7 * DAY, "AMD CRL is stale"),
        ({"this_update": NOW + DAY, "next_update": NOW + 8 * DAY}, NOW, "AMD CRL is not yet valid"),
        ({"signer": "other"}, NOW, "AMD CRL signature does not verify with ARK-Milan"),
        ({"rsa_padding": padding.PKCS1v15()}, NOW, "AMD CRL is not signed with RSASSA-PSS"),
        (
            {"digest": hashes.SHA256(), "rsa_padding": padding.PSS(padding.MGF1(hashes.SHA256()), 32)},
            NOW,
            "does not use SHA-384",
        ),
        ({"issuer": "SEV-Milan"}, NOW, r"AMD CRL is issued by .*CN=SEV-Milan.*, not .*CN=ARK-Milan"),
    ],
    ids=[
        "past-next-update",
        "at-next-update",
        "before-this-update",
        "other-signer",
        "pkcs1",
        "sha256",
        "wrong-issuer",
    ],
)
def test_a_crl_that_is_stale_or_badly_signed_is_refused(
    crl_args: dict[str, object], now: datetime.datetime, message: str
) -> None:
    fake = _fake()
    args = dict(crl_args)
    if args.get("signer") == "other":
        args["signer"] = _rsa("other")
    if args.get("issuer") == "SEV-Milan":
        args["issuer"] = fake.middle.subject
    with pytest.raises(EvidenceError, match=message):
        _verify(fake, _crl(fake, **args), now=now)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "crl",
    [b"", b"not a crl", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"],
    ids=["empty", "junk", "pem"],
)
def test_a_crl_that_does_not_parse_is_refused(crl: bytes) -> None:
    with pytest.raises(EvidenceError, match="AMD CRL does not parse"):
        _verify(_fake(), crl)


def test_an_oversized_crl_is_refused_before_parsing() -> None:
    with pytest.raises(EvidenceError, match="over the"):
        _verify(_fake(), b"\x30" * (MAX_CRL_BYTES + 1))


def test_the_verifier_takes_the_crl_from_collateral_before_the_evidence() -> None:
    fake = _fake()
    good, revoking = _crl(fake), _crl(fake, revoked=(fake.leaf,))
    parts = {"report": _report(fake), "vcek": _pem(fake.leaf), "cert_chain": fake.chain, "crl": revoking}
    evidence = Evidence(platform="sev-snp", parts=parts)
    verifier = SevSnpVerifier(roots=fake.roots)
    report_data = b"\x11" * 64
    with pytest.raises(EvidenceError, match="is revoked"):
        verifier.verify(evidence, report_data=report_data, now=NOW)
    claims = verifier.verify(evidence, report_data=report_data, now=NOW, collateral={"crl": good})
    assert "no AMD CRL" not in " ".join(claims.details["not_checked"])


@pytest.mark.parametrize(
    ("report", "vcek", "chain", "when"),
    [
        ("gosev_attestation.bin", "gosev_vcek.testcer.der", "gosev_milan_ask_ark.pem", "2026-11-21"),
        ("trustee_test-report.bin", "trustee_test-vcek.der", "trustee_milan_ask_ark_asvk.pem", "2026-11-21"),
    ],
)
def test_real_chains_still_verify_and_name_revocation_unchecked(
    report: str, vcek: str, chain: str, when: str
) -> None:
    now = datetime.datetime.fromisoformat(when).replace(tzinfo=datetime.UTC)
    verified = verify_report(
        (VECTORS / report).read_bytes(),
        (VECTORS / vcek).read_bytes(),
        (VECTORS / chain).read_bytes(),
        now=now,
    )
    assert not verified.crl_checked
    assert "revocation" in verified.not_checked()
    assert any("not checked" in gap for gap in verified.details()["not_checked"])


def test_a_crl_signed_by_a_synthetic_ark_does_not_pass_for_a_real_chain() -> None:
    fake = _fake()
    real = [
        VECTORS / n for n in ("gosev_attestation.bin", "gosev_vcek.testcer.der", "gosev_milan_ask_ark.pem")
    ]
    report, vcek, chain = (p.read_bytes() for p in real)
    real_ark = x509.load_pem_x509_certificates(chain)[1]
    with pytest.raises(EvidenceError, match=r"AMD CRL is issued by .*, not .*CN=ARK-Milan"):
        verify_report(report, vcek, chain, now=NOW, crl=_crl(fake))
    with pytest.raises(EvidenceError, match="AMD CRL signature does not verify with ARK-Milan"):
        verify_report(report, vcek, chain, now=NOW, crl=_crl(fake, issuer=real_ark.subject))
