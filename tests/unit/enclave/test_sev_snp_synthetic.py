"""SEV-SNP verification against chains this test forges, for what no real vector covers.

No Turin report, VLEK-signed report or masked CHIP_ID exists in ../shared/vectors,
so these tests build AMD-shaped chains (RSA-PSS SHA-384 salt 48, AMD extension
OIDs) and P-384-signed reports themselves. A forged chain is refused under the
pinned AMD roots and accepted only when the test passes its own ARK as a root.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from enclave.attestation.sev_snp import VerifiedReport, verify_report
from enclave.attestation.sev_snp_certs import OID_CSP_ID, OID_HWID, OID_PRODUCT_NAME, TCB_OIDS
from enclave.attestation.sev_snp_report import Product, SigningKey
from enclave.errors import EvidenceError

NOW = datetime.datetime(2026, 11, 21, tzinfo=datetime.UTC)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
VALID = (
    datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
)
HWID = bytes(range(100, 164))


@functools.cache
def _rsa(slot: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(
    cn: str,
    issuer_cn: str,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    signer: rsa.RSAPrivateKey,
    *,
    ca: bool,
    extensions: Sequence[tuple[x509.ObjectIdentifier, bytes]] = (),
    valid: tuple[datetime.datetime, datetime.datetime] = VALID,
    rsa_padding: padding.PSS | padding.PKCS1v15 = PSS,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(public_key)
        .serial_number(_serial(cn))
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    for oid, value in extensions:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=rsa_padding)


def _serial(cn: str) -> int:
    """A distinct serial per certificate name, so a CRL entry names exactly one of them."""
    return int.from_bytes(hashlib.sha256(cn.encode()).digest()[:8], "big") >> 1


def _der_int(n: int) -> bytes:
    body = n.to_bytes(2, "big") if n >= 0x80 else bytes([n])
    return bytes([0x02, len(body)]) + body


def _ia5(text: str) -> bytes:
    return bytes([0x16, len(text)]) + text.encode()


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


@dataclass
class Fake:
    product: Product
    kind: SigningKey
    ark: x509.Certificate
    middle: x509.Certificate
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey

    @property
    def chain(self) -> bytes:
        return _pem(self.middle, self.ark)

    @property
    def roots(self) -> list[bytes]:
        return [_pem(self.ark)]


def _fake(
    product: Product = Product.MILAN,
    kind: SigningKey = SigningKey.VCEK,
    *,
    tcb: dict[str, int] | None = None,
    hwid: bytes | None = HWID,
    product_name: str | None = None,
    middle_valid: tuple[datetime.datetime, datetime.datetime] = VALID,
    middle_ca: bool = True,
    leaf_curve: ec.EllipticCurve | None = None,
    leaf_padding: padding.PSS | padding.PKCS1v15 = PSS,
) -> Fake:
    p = product.value
    ark_key, middle_key = _rsa("ark"), _rsa("middle")
    ark = _cert(f"ARK-{p}", f"ARK-{p}", ark_key.public_key(), ark_key, ca=True)
    middle_cn = f"SEV-{p}" if kind is SigningKey.VCEK else f"SEV-VLEK-{p}"
    middle = _cert(middle_cn, f"ARK-{p}", middle_key.public_key(), ark_key, ca=middle_ca, valid=middle_valid)
    leaf_key = ec.generate_private_key(leaf_curve or ec.SECP384R1())
    tcb = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115} if tcb is None else tcb
    extensions = [(OID_PRODUCT_NAME, _ia5(product_name or p))]
    extensions += [(TCB_OIDS[name], _der_int(value)) for name, value in tcb.items()]
    if kind is SigningKey.VCEK and hwid is not None:
        extensions.append((OID_HWID, hwid))
    if kind is SigningKey.VLEK:
        extensions.append((OID_CSP_ID, _ia5("ExampleCloud")))
    leaf = _cert(
        f"SEV-{kind.name}",
        middle_cn,
        leaf_key.public_key(),
        middle_key,
        ca=False,
        extensions=extensions,
        rsa_padding=leaf_padding,
    )
    return Fake(product, kind, ark, middle, leaf, leaf_key)


def _report(
    fake: Fake,
    *,
    reported_tcb: bytes = bytes([3, 0, 0, 0, 0, 0, 8, 115]),
    chip_id: bytes = HWID,
    version: int = 2,
    cpuid: bytes = bytes(3),
    key_info: int | None = None,
) -> bytes:
    r = bytearray(1184)
    r[0x00:0x04] = version.to_bytes(4, "little")
    r[0x08:0x10] = (1 << 17 | 1 << 16).to_bytes(8, "little")
    r[0x34:0x38] = (1).to_bytes(4, "little")
    r[0x48:0x4C] = (fake.kind.value << 2 if key_info is None else key_info).to_bytes(4, "little")
    r[0x50:0x90] = b"\x11" * 64
    r[0x90:0xC0] = b"\x22" * 48
    for offset in (0x38, 0x180, 0x1E0, 0x1F0):
        r[offset : offset + 8] = reported_tcb
    if version >= 3:
        r[0x188:0x18B] = cpuid
    r[0x1A0:0x1E0] = chip_id.ljust(64, b"\0")
    signature = fake.leaf_key.sign(bytes(r[:0x2A0]), ec.ECDSA(hashes.SHA384()))
    sig_r, sig_s = decode_dss_signature(signature)
    r[0x2A0:0x2E8] = sig_r.to_bytes(72, "little")
    r[0x2E8:0x330] = sig_s.to_bytes(72, "little")
    return bytes(r)


def _verify(fake: Fake, report: bytes) -> VerifiedReport:
    return verify_report(report, _pem(fake.leaf), fake.chain, now=NOW, roots=fake.roots)


def test_forged_chain_is_refused_under_the_pinned_amd_roots() -> None:
    fake = _fake()
    with pytest.raises(EvidenceError, match=r"ARK-Milan \(sha256 [0-9a-f]{64}\) is not a trusted AMD root"):
        verify_report(_report(fake), _pem(fake.leaf), fake.chain, now=NOW)


def test_forged_chain_verifies_only_under_its_own_root() -> None:
    fake = _fake()
    verified = _verify(fake, _report(fake))
    assert verified.product is Product.MILAN
    assert verified.details()["chip_id"] == HWID.hex()
    assert any("CHIP_ID equals" in c for c in verified.checks)


def test_ask_signed_by_another_key_fails_against_the_real_ark_name() -> None:
    fake = _fake()
    other = _rsa("other")
    impostor = _cert("ARK-Milan", "ARK-Milan", other.public_key(), other, ca=True)
    with pytest.raises(EvidenceError, match="SEV-Milan signature does not verify with ARK-Milan"):
        verify_report(
            _report(fake), _pem(fake.leaf), _pem(fake.middle, impostor), now=NOW, roots=[_pem(impostor)]
        )


def test_turin_layout_binds_fmc_and_an_8_byte_hwid() -> None:
    tcb = {"fmc": 1, "bootloader": 2, "tee": 3, "snp": 4, "microcode": 5}
    reported = bytes([1, 2, 3, 4, 0, 0, 0, 5])
    turin_cpuid = bytes([0x1A, 0x02, 0x01])
    for hwid in (HWID[:8], b"\x04\x08" + HWID[:8]):  # raw, and wrapped in an OCTET STRING
        fake = _fake(Product.TURIN, tcb=tcb, hwid=hwid)
        verified = _verify(
            fake, _report(fake, reported_tcb=reported, chip_id=HWID[:8], version=3, cpuid=turin_cpuid)
        )
        assert verified.reported_tcb.components() == tcb
        assert verified.details()["reported_tcb"]["fmc"] == 1
    fake = _fake(Product.TURIN, tcb={**tcb, "fmc": 9}, hwid=HWID[:8])
    with pytest.raises(EvidenceError, match=r"REPORTED_TCB .* fmc 1 vs VCEK 9"):
        _verify(fake, _report(fake, reported_tcb=reported, chip_id=HWID[:8], version=3, cpuid=turin_cpuid))


def test_turin_vcek_without_fmc_extension_is_refused() -> None:
    fake = _fake(Product.TURIN, tcb={"bootloader": 2, "tee": 3, "snp": 4, "microcode": 5}, hwid=HWID[:8])
    with pytest.raises(EvidenceError, match="lacks the fmc TCB extension"):
        _verify(fake, _report(fake, reported_tcb=bytes([1, 2, 3, 4, 0, 0, 0, 5]), chip_id=HWID[:8]))


def test_vlek_report_verifies_without_chip_binding() -> None:
    fake = _fake(Product.GENOA, SigningKey.VLEK)
    verified = _verify(fake, _report(fake, chip_id=bytes(64)))
    details = verified.details()
    assert (details["signing_key"], details["product"], details["csp_id"]) == (
        "VLEK",
        "Genoa",
        "ExampleCloud",
    )
    assert any("VLEK is issued per cloud provider" in c for c in verified.checks)


def test_report_and_certificate_must_agree_on_vcek_or_vlek() -> None:
    vcek = _fake()
    with pytest.raises(EvidenceError, match="KEY_INFO says VLEK but the certificate is 'SEV-VCEK'"):
        _verify(vcek, _report(vcek, key_info=SigningKey.VLEK.value << 2))


def test_masked_chip_id_is_accepted_and_flagged() -> None:
    fake = _fake()
    verified = _verify(fake, _report(fake, chip_id=bytes(64)))
    assert verified.details()["chip_id_masked"] is True
    assert any("MaskChipId" in c for c in verified.checks)


@pytest.mark.parametrize(
    ("key_info", "needle"),
    [(0b10, "MASK_CHIP_KEY is set"), (7 << 2, "SIGNING_KEY is 7")],
    ids=["mask", "none"],
)
def test_unsigned_reports_are_refused(key_info: int, needle: str) -> None:
    fake = _fake()
    with pytest.raises(EvidenceError, match=needle):
        _verify(fake, _report(fake, key_info=key_info))


def test_cpu_family_of_a_version_3_report_must_match_the_chain() -> None:
    fake = _fake()
    assert _verify(fake, _report(fake, version=3, cpuid=bytes([0x19, 0x01, 0x01])))
    with pytest.raises(EvidenceError, match="CPUID_FAM_ID 0x1a is not the Milan family"):
        _verify(fake, _report(fake, version=3, cpuid=bytes([0x1A, 0x02, 0x01])))


def test_vcek_product_name_must_match_the_chain() -> None:
    fake = _fake(product_name="Genoa")
    with pytest.raises(EvidenceError, match="product name 'Genoa' is not Milan"):
        _verify(fake, _report(fake))


def test_expired_ask_is_refused() -> None:
    expired = (VALID[0], datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC))
    fake = _fake(middle_valid=expired)
    with pytest.raises(EvidenceError, match="SEV-Milan certificate is not valid at 2026-11-21"):
        _verify(fake, _report(fake))


def test_ask_must_be_a_ca() -> None:
    fake = _fake(middle_ca=False)
    with pytest.raises(EvidenceError, match="SEV-Milan is not a CA certificate"):
        _verify(fake, _report(fake))


@pytest.mark.parametrize(
    ("rsa_padding", "needle"),
    [
        (padding.PKCS1v15(), "VCEK is not signed with RSASSA-PSS"),
        (padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=32), "VCEK signature does not verify"),
    ],
    ids=["pkcs1v15", "pss-salt-32"],
)
def test_vcek_must_be_signed_with_pss_salt_48(
    rsa_padding: padding.PSS | padding.PKCS1v15, needle: str
) -> None:
    fake = _fake(leaf_padding=rsa_padding)
    with pytest.raises(EvidenceError, match=needle):
        _verify(fake, _report(fake))


def test_vcek_key_must_be_p384() -> None:
    fake = _fake(leaf_curve=ec.SECP256R1())
    with pytest.raises(EvidenceError, match="not an ECDSA P-384 key"):
        _verify(fake, _report(fake))


def test_two_different_asks_with_one_name_are_refused() -> None:
    fake = _fake()
    other_ask = _cert("SEV-Milan", "ARK-Milan", _rsa("other").public_key(), _rsa("ark"), ca=True)
    with pytest.raises(EvidenceError, match="holds 2 different ASKs"):
        verify_report(
            _report(fake), _pem(fake.leaf), _pem(fake.middle, other_ask, fake.ark), now=NOW, roots=fake.roots
        )


def test_malformed_tcb_extension_is_refused() -> None:
    fake = _fake(tcb={"bootloader": 3, "tee": 0, "snp": 8, "microcode": 300})
    with pytest.raises(EvidenceError, match=r"microcode TCB extension is 300, outside 0\.\.255"):
        _verify(fake, _report(fake))
