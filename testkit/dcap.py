"""A DCAP PKI of our own for tests: root -> PCK CA -> PCK leaf with the SGX extension, a TCB
Signing certificate, genuine quotes (SGX v3, TDX v4/v5) and signed collateral, built with
``cryptography``. Same shape as Intel's; only a test passes its root as the trust anchor.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclave.attestation.dcap_quote import INTEL_QE_VENDOR_ID

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


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Pki:
    root_key: ec.EllipticCurvePrivateKey = field(default_factory=new_key)
    ca_key: ec.EllipticCurvePrivateKey = field(default_factory=new_key)
    leaf_key: ec.EllipticCurvePrivateKey = field(default_factory=new_key)
    signing_key: ec.EllipticCurvePrivateKey = field(default_factory=new_key)

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


# --- quotes -----------------------------------------------------------------------------------


def raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
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
    # RTMR3 of a TD: all zero where the guest extends nothing at run time.
    rtmr3: bytes = b"\x33" * 48

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
            + b"".join(bytes([0x30 + i]) * 48 for i in range(3))
            + spec.rtmr3
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
    att_key = new_key()
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
    qe_data = qe_report + raw_sign(pki.leaf_key, qe_report) + struct.pack("<H", len(auth)) + auth
    qe_data += struct.pack("<HI", 5, len(pem)) + pem
    if spec.version != 3:
        qe_data = struct.pack("<HI", 6, len(qe_data)) + qe_data
    sig_data = raw_sign(att_key, signed) + att_pub[1:] + qe_data
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
        "tcbEvaluationDataNumber": kw.get("evaluation", 17),
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
        "issueDate": kw.get("issued", "2026-01-10T00:00:00Z"),
        "nextUpdate": kw.get("next", "2026-02-10T00:00:00Z"),
        "tcbEvaluationDataNumber": kw.get("evaluation", 17),
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
    signature = raw_sign(signer or pki.signing_key, text).hex()
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
