"""DCAP verification against a PKI of our own: root -> PCK CA -> PCK leaf, and a TCB Signing cert.

The real vectors cannot exercise revocation (Intel's CRLs list none of their
certificates), every TCB status, or a Revoked level; a test PKI with the same
shape can. Each test builds a genuine quote and collateral with ``cryptography``
and passes our root as the trust anchor.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclave.attestation.dcap import verify_quote
from enclave.attestation.dcap_quote import INTEL_QE_VENDOR_ID
from enclave.attestation.dcap_tcb import NON_TERMINAL_STATUSES
from enclave.attestation.interface import Evidence
from enclave.attestation.tdx import TdxVerifier
from enclave.errors import BindingError, EvidenceError

NOW = datetime(2026, 1, 15, tzinfo=UTC)
FMSPC = bytes.fromhex("00906ed50000")
SGX_COMPS = (5, 5, 2, 2, 3, 1, 0, 3) + (0,) * 8
PCESVN = 11
TEE_TCB_SVN = bytes([3, 0, 5]) + bytes(13)
QE_MRSIGNER = hashlib.sha256(b"test quoting enclave signer").digest()
SGX = "1.2.840.113741.1.13.1"


# --- a little DER, for the PCK leaf's SGX extension ---------------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = (
        bytes([n])
        if n < 0x80
        else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + length + content


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _entry(oid: str, tag: int, content: bytes) -> bytes:
    return _der(0x30, _oid(oid) + _der(tag, content))


def _small_int(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big")


def sgx_extension(fmspc: bytes, comps: Sequence[int], pcesvn: int) -> bytes:
    tcb = b"".join(_entry(f"{SGX}.2.{i + 1}", 0x02, _small_int(c)) for i, c in enumerate(comps))
    tcb += _entry(f"{SGX}.2.17", 0x02, _small_int(pcesvn)) + _entry(f"{SGX}.2.18", 0x04, bytes(comps))
    return _der(
        0x30,
        _entry(f"{SGX}.1", 0x04, bytes(range(16)))
        + _der(0x30, _oid(f"{SGX}.2") + _der(0x30, tcb))
        + _entry(f"{SGX}.3", 0x04, b"\x00\x00")
        + _entry(f"{SGX}.4", 0x04, fmspc)
        + _entry(f"{SGX}.5", 0x0A, b"\x00"),
    )


# --- the PKI ----------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    not_after: datetime = NOW + timedelta(days=3650),
    extension: bytes | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (_name(cn), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=365))
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=(None if issuer is None else 0) if ca else None), True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
    )
    if extension is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX), extension), False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Pki:
    root_key: ec.EllipticCurvePrivateKey = field(default_factory=_key)
    ca_key: ec.EllipticCurvePrivateKey = field(default_factory=_key)
    leaf_key: ec.EllipticCurvePrivateKey = field(default_factory=_key)
    signing_key: ec.EllipticCurvePrivateKey = field(default_factory=_key)

    def __post_init__(self) -> None:
        self.root = _cert("Test SGX Root CA", self.root_key, None, ca=True)
        self.ca = _cert("Intel SGX PCK Platform CA", self.ca_key, (self.root, self.root_key), ca=True)
        self.leaf = self.make_leaf()
        self.signing = _cert("Intel SGX TCB Signing", self.signing_key, (self.root, self.root_key), ca=False)

    def make_leaf(self, **kw: Any) -> x509.Certificate:
        extension = sgx_extension(
            kw.pop("fmspc", FMSPC), kw.pop("comps", SGX_COMPS), kw.pop("pcesvn", PCESVN)
        )
        return _cert(
            "Intel SGX PCK Certificate",
            self.leaf_key,
            (self.ca, self.ca_key),
            ca=False,
            extension=extension,
            **kw,
        )

    @property
    def root_der(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.DER)

    def chain_pem(self, leaf: x509.Certificate | None = None) -> bytes:
        certs = (leaf or self.leaf, self.ca, self.root)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs) + b"\x00"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


# --- quotes -----------------------------------------------------------------------------------


def _raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def enclave_report(
    *, attributes: bytes, mrsigner: bytes, isvprodid: int, isvsvn: int, reportdata: bytes, mrenclave: bytes
) -> bytes:
    report = (
        bytes(16)  # cpusvn
        + bytes(4)  # miscselect
        + bytes(12 + 16)
        + attributes
        + mrenclave
        + bytes(32)
        + mrsigner
        + bytes(32 + 64)
        + struct.pack("<HHH", isvprodid, isvsvn, 0)
        + bytes(42 + 16)
        + reportdata
    )
    assert len(report) == 384
    return report


@dataclass(frozen=True)
class Spec:
    version: int = 4
    body_type: int = 2  # 1 SGX, 2 TDX 1.0, 3 TDX 1.5
    tee_tcb_svn: bytes = TEE_TCB_SVN
    mrsignerseam: bytes = bytes(48)
    td_attributes: bytes = bytes(8)
    sgx_attributes: bytes = bytes([0x05]) + bytes(7) + bytes([0xE7]) + bytes(7)
    report_data: bytes = b"\x42" * 64
    qe_isvsvn: int = 4
    trailing: bytes = b""

    @property
    def tdx(self) -> bool:
        return self.body_type != 1


def build_quote(
    pki: Pki, spec: Spec = Spec(), *, leaf: x509.Certificate | None = None, chain_pem: bytes | None = None
) -> bytes:
    tee = 0x81 if spec.tdx else 0
    header = struct.pack("<HHIHH", spec.version, 2, tee, 0, 0) + INTEL_QE_VENDOR_ID + b"\x07" * 20
    if spec.tdx:
        body = spec.tee_tcb_svn + b"\x11" * 48 + spec.mrsignerseam + bytes(8) + spec.td_attributes + bytes(8)
        body += (
            b"\x22" * 48
            + bytes(48 * 3)
            + b"".join(bytes([0x30 + i]) * 48 for i in range(4))
            + spec.report_data
        )
        if spec.body_type == 3:
            body += spec.tee_tcb_svn + bytes(48)
    else:
        body = enclave_report(
            attributes=spec.sgx_attributes,
            mrsigner=b"\x33" * 32,
            isvprodid=1,
            isvsvn=1,
            reportdata=spec.report_data,
            mrenclave=b"\x44" * 32,
        )
    if spec.version == 5:
        body = struct.pack("<HI", spec.body_type, len(body)) + body
    signed = header + body
    att_key = _key()
    att_pub = att_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    auth = b"\x5a" * 32
    qe_report = enclave_report(
        attributes=bytes([0x11]) + bytes(15),
        mrsigner=QE_MRSIGNER,
        isvprodid=2 if spec.tdx else 1,
        isvsvn=spec.qe_isvsvn,
        reportdata=hashlib.sha256(att_pub[1:] + auth).digest() + bytes(32),
        mrenclave=b"\x55" * 32,
    )
    pem = chain_pem if chain_pem is not None else pki.chain_pem(leaf)
    qe_data = qe_report + _raw_sign(pki.leaf_key, qe_report) + struct.pack("<H", len(auth)) + auth
    qe_data += struct.pack("<HI", 5, len(pem)) + pem
    if spec.version != 3:
        qe_data = struct.pack("<HI", 6, len(qe_data)) + qe_data
    sig_data = _raw_sign(att_key, signed) + att_pub[1:] + qe_data
    return signed + struct.pack("<I", len(sig_data)) + sig_data + spec.trailing


# --- collateral -------------------------------------------------------------------------------


def level(status: str = "UpToDate", **kw: Any) -> dict[str, Any]:
    tcb: dict[str, Any] = {
        "sgxtcbcomponents": [{"svn": c} for c in kw.get("sgx", SGX_COMPS)],
        "pcesvn": kw.get("pcesvn", PCESVN),
    }
    if kw.get("tdx", True) is not None:
        tcb["tdxtcbcomponents"] = [{"svn": c} for c in kw.get("tdx", TEE_TCB_SVN)]
    out = {"tcb": tcb, "tcbDate": kw.get("date", "2025-01-01T00:00:00Z"), "tcbStatus": status}
    if "advisories" in kw:
        out["advisoryIDs"] = kw["advisories"]
    return out


def tcb_info(levels: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": kw.get("id", "TDX"),
        "version": 3,
        "issueDate": kw.get("issued", "2026-01-10T00:00:00Z"),
        "nextUpdate": kw.get("next", "2026-02-10T00:00:00Z"),
        "fmspc": kw.get("fmspc", FMSPC.hex().upper()),
        "pceId": "0000",
        "tcbType": 0,
        "tcbEvaluationDataNumber": 17,
        "tcbLevels": levels,
    }
    if doc["id"] == "TDX":
        doc["tdxModule"] = {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8}
        if "modules" in kw:
            doc["tdxModuleIdentities"] = kw["modules"]
    return doc


def qe_identity(levels: list[tuple[int, str]], **kw: Any) -> dict[str, Any]:
    return {
        "id": kw.get("id", "TD_QE"),
        "version": 2,
        "issueDate": "2026-01-10T00:00:00Z",
        "nextUpdate": "2026-02-10T00:00:00Z",
        "tcbEvaluationDataNumber": 17,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": "11" + "00" * 15,
        "attributesMask": "FBFFFFFFFFFFFFFF" + "00" * 8,
        "mrsigner": kw.get("mrsigner", QE_MRSIGNER.hex().upper()),
        "isvprodid": kw.get("isvprodid", 2),
        "tcbLevels": [
            {"tcb": {"isvsvn": svn}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": st} for svn, st in levels
        ],
    }


def signed(
    pki: Pki, key: str, doc: dict[str, Any], signer: ec.EllipticCurvePrivateKey | None = None
) -> bytes:
    text = json.dumps(doc, separators=(",", ":")).encode()
    signature = _raw_sign(signer or pki.signing_key, text).hex()
    return b'{"' + key.encode() + b'":' + text + b',"signature":"' + signature.encode() + b'"}'


def crl(
    issuer: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    revoked: Sequence[int] = (),
    *,
    this: datetime = NOW - timedelta(days=1),
) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this)
        .next_update(this + timedelta(days=30))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def collateral(pki: Pki, **overrides: bytes | None) -> dict[str, bytes]:
    chain = pki.signing.public_bytes(serialization.Encoding.PEM) + pki.root.public_bytes(
        serialization.Encoding.PEM
    )
    out: dict[str, bytes | None] = {
        "tcb_info": signed(pki, "tcbInfo", tcb_info([level()])),
        "tcb_info_issuer_chain": chain,
        "qe_identity": signed(pki, "enclaveIdentity", qe_identity([(4, "UpToDate")])),
        "qe_identity_issuer_chain": chain,
        "root_ca_crl": crl(pki.root, pki.root_key),
        "pck_crl": crl(pki.ca, pki.ca_key),
    }
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def verify(pki: Pki, quote: bytes, coll: dict[str, bytes] | None = None, **kw: Any) -> Any:
    return verify_quote(quote, now=kw.pop("now", NOW), collateral=coll, trust_anchor=pki.root_der, **kw)


# --- tests ------------------------------------------------------------------------------------


def test_genuine_synthetic_quote_verifies_with_every_check(pki: Pki) -> None:
    result = verify(pki, build_quote(pki), collateral(pki))
    assert result.tcb_status == "UpToDate"
    assert result.checks_not_done == {}
    assert set(result.checks_done) >= {
        "pck_chain",
        "root_ca_crl",
        "pck_crl",
        "tcb_info",
        "qe_identity",
        "tcb_level",
    }
    assert result.details()["fmspc"] == FMSPC.hex()


@pytest.mark.parametrize(
    "spec",
    [Spec(version=5, body_type=2), Spec(version=5, body_type=3), Spec(trailing=b"\x00" * 70)],
    ids=["v5-td10", "v5-td15", "trailing-zeros"],
)
def test_quote_layouts(pki: Pki, spec: Spec) -> None:
    result = verify(pki, build_quote(pki, spec), collateral(pki))
    assert result.quote.trailing_bytes == len(spec.trailing)
    assert result.tcb_status == "UpToDate"


@pytest.mark.parametrize(
    "spec",
    [Spec(version=3, body_type=1), Spec(version=4, body_type=1), Spec(version=5, body_type=1)],
    ids=["v3", "v4", "v5"],
)
def test_sgx_quote_with_tcb_info_v2(pki: Pki, spec: Spec) -> None:
    v2_level = {
        "tcb": {**{f"sgxtcbcomp{i + 1:02d}svn": c for i, c in enumerate(SGX_COMPS)}, "pcesvn": PCESVN},
        "tcbDate": "2025-01-01T00:00:00Z",
        "tcbStatus": "SWHardeningNeeded",
        "advisoryIDs": ["INTEL-SA-00615"],
    }
    info = tcb_info([v2_level], id="SGX")
    del info["id"]
    info["version"] = 2
    coll = collateral(
        pki,
        tcb_info=signed(pki, "tcbInfo", info),
        qe_identity=signed(pki, "enclaveIdentity", qe_identity([(4, "UpToDate")], id="QE", isvprodid=1)),
    )
    result = verify(pki, build_quote(pki, spec), coll)
    assert result.tcb_status == "SWHardeningNeeded"
    assert result.tcb is not None
    assert result.tcb.advisory_ids == ("INTEL-SA-00615",)


def test_crls_may_be_pem_or_hex(pki: Pki) -> None:
    root_crl = x509.load_der_x509_crl(crl(pki.root, pki.root_key)).public_bytes(serialization.Encoding.PEM)
    coll = collateral(pki, root_ca_crl=root_crl, pck_crl=crl(pki.ca, pki.ca_key).hex().encode())
    assert {"root_ca_crl", "pck_crl"} <= set(verify(pki, build_quote(pki), coll).checks_done)


def test_the_pinned_intel_root_refuses_a_foreign_chain(pki: Pki) -> None:
    with pytest.raises(EvidenceError, match="not the trusted root"):
        verify_quote(build_quote(pki), now=NOW)


def test_revoked_pck_certificate_is_refused(pki: Pki) -> None:
    coll = collateral(pki, pck_crl=crl(pki.ca, pki.ca_key, [pki.leaf.serial_number]))
    with pytest.raises(EvidenceError, match="revoked by the PCK CRL"):
        verify(pki, build_quote(pki), coll)


def test_crl_signed_by_another_key_is_refused(pki: Pki) -> None:
    coll = collateral(pki, pck_crl=crl(pki.ca, _key(), [pki.leaf.serial_number]))
    with pytest.raises(EvidenceError, match="pck_crl signature does not verify"):
        verify(pki, build_quote(pki), coll)


def test_pck_ca_revoked_by_the_root_crl_is_refused(pki: Pki) -> None:
    coll = collateral(pki, root_ca_crl=crl(pki.root, pki.root_key, [pki.ca.serial_number]))
    with pytest.raises(EvidenceError, match=r"PCK CA certificate .* is revoked by the Root CA CRL"):
        verify(pki, build_quote(pki), coll)


def test_tcb_signing_certificate_revoked_by_the_root_crl_is_refused(pki: Pki) -> None:
    coll = collateral(pki, root_ca_crl=crl(pki.root, pki.root_key, [pki.signing.serial_number]))
    with pytest.raises(EvidenceError, match=r"tcb_info signer certificate .* is revoked"):
        verify(pki, build_quote(pki), coll)


def test_pck_crl_of_another_ca_is_refused(pki: Pki) -> None:
    coll = collateral(pki, pck_crl=crl(pki.root, pki.root_key))
    with pytest.raises(EvidenceError, match="not by the expected CA"):
        verify(pki, build_quote(pki), coll)


@pytest.mark.parametrize("status", NON_TERMINAL_STATUSES)
def test_each_tcb_status_is_reported(pki: Pki, status: str) -> None:
    higher = level(sgx=(9,) * 16, date="2025-06-01T00:00:00Z")  # first level: the platform is below it
    info = tcb_info([higher, level(status, advisories=["INTEL-SA-00001"])])
    result = verify(pki, build_quote(pki), collateral(pki, tcb_info=signed(pki, "tcbInfo", info)))
    assert result.tcb_status == status
    assert result.details()["advisory_ids"] == ["INTEL-SA-00001"]


def test_revoked_tcb_level_is_refused(pki: Pki) -> None:
    coll = collateral(pki, tcb_info=signed(pki, "tcbInfo", tcb_info([level("Revoked")])))
    with pytest.raises(EvidenceError, match="Revoked"):
        verify(pki, build_quote(pki), coll)


def test_platform_below_every_level_is_refused(pki: Pki) -> None:
    coll = collateral(pki, tcb_info=signed(pki, "tcbInfo", tcb_info([level(pcesvn=PCESVN + 1)])))
    with pytest.raises(EvidenceError, match="no matching TCB level"):
        verify(pki, build_quote(pki), coll)


def test_module_svn_bytes_count_only_for_module_major_version_zero(pki: Pki) -> None:
    """Intel's isTdxTcbHigherOrEqual: TEE_TCB_SVN[0:2] are the module's when [1] != 0."""
    strict = tcb_info([level(tdx=bytes([9, 0, 5]) + bytes(13))])
    with pytest.raises(EvidenceError, match="no matching TCB level"):
        verify(pki, build_quote(pki), collateral(pki, tcb_info=signed(pki, "tcbInfo", strict)))
    module = {
        "id": "TDX_01",
        "mrsigner": "00" * 48,
        "attributes": "00" * 8,
        "attributesMask": "FF" * 8,
        "tcbLevels": [
            {"tcb": {"isvsvn": 4}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
            {"tcb": {"isvsvn": 2}, "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "OutOfDate"},
        ],
    }
    major1 = tcb_info([level(tdx=bytes([9, 0, 5]) + bytes(13))], modules=[module])
    spec = Spec(tee_tcb_svn=bytes([3, 1, 5]) + bytes(13))
    result = verify(pki, build_quote(pki, spec), collateral(pki, tcb_info=signed(pki, "tcbInfo", major1)))
    assert result.tcb is not None
    assert result.tcb.tdx_module is not None
    assert result.tcb.tdx_module.status == "OutOfDate"  # module SVN 3: the isvsvn 2 level
    assert result.tcb_status == "OutOfDate"  # UpToDate platform folded with an OutOfDate module


def test_module_major_version_without_identity_is_a_mismatch(pki: Pki) -> None:
    spec = Spec(tee_tcb_svn=bytes([3, 1, 5]) + bytes(13))
    with pytest.raises(EvidenceError, match="no TDX module identity TDX_01"):
        verify(pki, build_quote(pki, spec), collateral(pki))


def test_tdx_module_signer_mismatch_is_refused(pki: Pki) -> None:
    with pytest.raises(EvidenceError, match="TDX module mismatch: MRSIGNERSEAM"):
        verify(pki, build_quote(pki, Spec(mrsignerseam=b"\x01" * 48)), collateral(pki))


@pytest.mark.parametrize(
    ("platform_status", "expected"),
    [("UpToDate", "OutOfDate"), ("ConfigurationNeeded", "OutOfDateConfigurationNeeded")],
)
def test_out_of_date_qe_folds_into_the_status(pki: Pki, platform_status: str, expected: str) -> None:
    coll = collateral(
        pki,
        tcb_info=signed(pki, "tcbInfo", tcb_info([level(platform_status)])),
        qe_identity=signed(pki, "enclaveIdentity", qe_identity([(8, "UpToDate"), (2, "OutOfDate")])),
    )
    result = verify(pki, build_quote(pki), coll)
    assert result.tcb_status == expected
    assert result.tcb is not None
    assert result.tcb.qe is not None
    assert result.tcb.qe.status == "OutOfDate"


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        (qe_identity([(8, "UpToDate")]), "no matching QE identity TCB level"),
        (qe_identity([(4, "Revoked")]), "QE status is Revoked"),
        (qe_identity([(4, "UpToDate")], mrsigner="AB" * 32), "QE identity mismatch: MRSIGNER"),
        (qe_identity([(4, "UpToDate")], isvprodid=1), "QE identity mismatch: ISVPRODID"),
        (qe_identity([(4, "UpToDate")], id="QE"), "needs 'TD_QE'"),
    ],
    ids=["below-every-level", "revoked", "mrsigner", "isvprodid", "sgx-identity"],
)
def test_qe_identity_refusals(pki: Pki, identity: dict[str, Any], message: str) -> None:
    coll = collateral(pki, qe_identity=signed(pki, "enclaveIdentity", identity))
    with pytest.raises(EvidenceError, match=message):
        verify(pki, build_quote(pki), coll)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"tcb_info": "fmspc"}, "tcb_info is for FMSPC", id="other-fmspc"),
        pytest.param({"tcb_info": "sgx"}, "tcb_info is for SGX", id="sgx-tcb-info"),
        pytest.param(
            {"tcb_info": "foreign-signer"}, "tcb_info signature does not verify", id="foreign-signer"
        ),
        pytest.param(
            {"tcb_info_issuer_chain": "pck-ca"}, "leaf is 'Intel SGX PCK Platform CA'", id="ca-signs"
        ),
        pytest.param({"tcb_info": "issued-later"}, "after the verification time", id="issued-later"),
        pytest.param({"tcb_info_issuer_chain": None}, "needs 'tcb_info_issuer_chain'", id="no-chain"),
        pytest.param({"tcb_info": None}, "'tcb_info_issuer_chain' is given without", id="chain-only"),
        pytest.param({"quote_collateral": "{}"}, "either 'quote_collateral' or", id="both-forms"),
        pytest.param({"tcbinfo": "typo"}, "unknown DCAP collateral", id="unknown-name"),
        pytest.param(
            {"pck_crl_issuer_chain": "root"}, "does not start with the quote's PCK CA", id="crl-chain"
        ),
    ],
)
def test_collateral_refusals(pki: Pki, overrides: dict[str, str | None], message: str) -> None:
    pem = serialization.Encoding.PEM
    values: dict[str, bytes | None] = {
        "fmspc": signed(pki, "tcbInfo", tcb_info([level()], fmspc="00A06D080000")),
        "sgx": signed(pki, "tcbInfo", tcb_info([level(tdx=None)], id="SGX")),
        "foreign-signer": signed(pki, "tcbInfo", tcb_info([level()]), signer=_key()),
        "pck-ca": pki.ca.public_bytes(pem) + pki.root.public_bytes(pem),
        "issued-later": signed(pki, "tcbInfo", tcb_info([level()], issued="2026-01-20T00:00:00Z")),
        "{}": b"{}",
        "typo": b"x",
        "root": pki.root.public_bytes(pem),
    }
    changes = {k: (values[v] if v is not None else None) for k, v in overrides.items()}
    with pytest.raises(EvidenceError, match=message):
        verify(pki, build_quote(pki), collateral(pki, **changes))


def test_expired_collateral_is_refused_unless_accepted(pki: Pki) -> None:
    later = NOW + timedelta(days=60)
    with pytest.raises(EvidenceError, match="pck_crl expired"):
        verify(pki, build_quote(pki), collateral(pki), now=later)
    result = verify(pki, build_quote(pki), collateral(pki), now=later, accept_expired_collateral=True)
    assert len([w for w in result.warnings if "expired" in w]) == 4  # both CRLs, TCB info, QE identity


def test_expired_pck_certificate_is_refused(pki: Pki) -> None:
    leaf = pki.make_leaf(not_after=NOW - timedelta(days=1))
    with pytest.raises(EvidenceError, match=r"'Intel SGX PCK Certificate' is not valid at .*: expired"):
        verify(pki, build_quote(pki, leaf=leaf))


def test_certificate_with_a_negative_serial_is_malformed_not_a_warning(pki: Pki) -> None:
    """cryptography warns (CryptographyDeprecationWarning) on such a serial; the verifier refuses it."""
    der = pki.make_leaf(serial=0x42).public_bytes(serialization.Encoding.DER)
    at = der.index(b"\x02\x01\x42")
    bad = der[:at] + b"\x02\x01\xc2" + der[at + 3 :]  # serial -62
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    chain = pem + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (pki.ca, pki.root))
    with pytest.raises(EvidenceError, match=r"PCK certificate chain is malformed: .*serial number"):
        verify(pki, build_quote(pki, chain_pem=chain))


def test_debug_td_claim_and_verifier_policy(pki: Pki) -> None:
    spec = Spec(td_attributes=b"\x01" + bytes(7))
    quote = build_quote(pki, spec)
    result = verify(pki, quote, collateral(pki))
    assert result.details()["debug"] is True
    evidence = Evidence(platform="tdx", parts={"quote": quote})
    with pytest.raises(EvidenceError, match="DEBUG TD"):
        TdxVerifier(trust_anchor=pki.root_der).verify(evidence, report_data=spec.report_data, now=NOW)
    claims = TdxVerifier(trust_anchor=pki.root_der, allow_debug=True).verify(
        evidence, report_data=spec.report_data, now=NOW, collateral=collateral(pki)
    )
    assert claims.details["debug"] is True
    assert claims.registers["td_attributes"] == spec.td_attributes
    with pytest.raises(BindingError):
        TdxVerifier(trust_anchor=pki.root_der, allow_debug=True).verify(
            evidence, report_data=bytes(64), now=NOW
        )
