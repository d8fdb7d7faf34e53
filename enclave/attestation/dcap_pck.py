"""Intel's DCAP PKI: the pinned Intel SGX Root CA, certificate chains and the PCK SGX extension.

Chains are validated by hand (issuer name and ECDSA signature of each link,
validity at the caller's ``now``, CA flags, path length, expected common
names) because Intel's profile is not the web PKI's. Certificates that
``cryptography`` would only load with a deprecation warning (a serial number
that is not positive, ...) are refused as malformed; the warning is turned
into an error for that one load and nowhere else.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from enclave.attestation.certificates import check_validity
from enclave.errors import EvidenceError

# Intel SGX Root CA (CN=Intel SGX Root CA, valid 2018-05-21 .. 2049-12-31), DER.
# Source: Phala-Network/dcap-qvl src/TrustedRootCA.der, byte-identical to
# google/go-tdx-guest verify/trusted_root.pem and to the certificate Intel
# publishes at https://certificates.trustedservices.intel.com/Intel_SGX_Provisioning_Certification_RootCA.cer
INTEL_SGX_ROOT_CA_DER = bytes.fromhex(
    "3082028f30820234a003020102021422650cd65a9d3489f383b49552bf501b392706ac300a06082a8648ce3d04030230"
    "68311a301806035504030c11496e74656c2053475820526f6f74204341311a3018060355040a0c11496e74656c20436f"
    "72706f726174696f6e3114301206035504070c0b53616e746120436c617261310b300906035504080c024341310b3009"
    "060355040613025553301e170d3138303532313130343531305a170d3439313233313233353935395a3068311a301806"
    "035504030c11496e74656c2053475820526f6f74204341311a3018060355040a0c11496e74656c20436f72706f726174"
    "696f6e3114301206035504070c0b53616e746120436c617261310b300906035504080c024341310b3009060355040613"
    "0255533059301306072a8648ce3d020106082a8648ce3d030107034200040ba9c4c0c0c86193a3fe23d6b02cda10a8bb"
    "d4e88e48b4458561a36e705525f567918e2edc88e40d860bd0cc4ee26aacc988e505a953558c453f6b0904ae7394a381"
    "bb3081b8301f0603551d2304183016801422650cd65a9d3489f383b49552bf501b392706ac30520603551d1f044b3049"
    "3047a045a043864168747470733a2f2f6365727469666963617465732e7472757374656473657276696365732e696e74"
    "656c2e636f6d2f496e74656c534758526f6f7443412e646572301d0603551d0e0416041422650cd65a9d3489f383b495"
    "52bf501b392706ac300e0603551d0f0101ff04040302010630120603551d130101ff040830060101ff020101300a0608"
    "2a8648ce3d0403020349003046022100e5bfe50911f92f428920dc368a302ee3d12ec5867ff622ec6497f78060c13c20"
    "022100e09d25ac7a0cb3e5e8e68fec5fa3bd416c47440bd950639d450edcbea4576aa2"
)
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
assert hashlib.sha256(INTEL_SGX_ROOT_CA_DER).hexdigest() == INTEL_SGX_ROOT_CA_SHA256

PCK_LEAF_CN = "Intel SGX PCK Certificate"
PCK_CA_CNS = ("Intel SGX PCK Platform CA", "Intel SGX PCK Processor CA")
TCB_SIGNING_CN = "Intel SGX TCB Signing"
SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX = "1.2.840.113741.1.13.1"
MAX_CHAIN_CERTS = 4
_T = TypeVar("_T")


@dataclass(frozen=True)
class PckCertificate:
    """The PCK leaf and its issuing CA, with the leaf's SGX extension decoded."""

    leaf: x509.Certificate
    ca: x509.Certificate
    fmspc: bytes
    pceid: bytes
    ppid: bytes
    cpusvn: bytes
    pcesvn: int
    sgx_tcb_components: tuple[int, ...]
    sgx_type: int | None

    @property
    def ca_name(self) -> str:
        return common_name(self.ca)

    def details(self) -> dict[str, object]:
        return {
            "fmspc": self.fmspc.hex(),
            "pceid": self.pceid.hex(),
            "pcesvn": self.pcesvn,
            "cpusvn": self.cpusvn.hex(),
            "sgx_tcb_comps": list(self.sgx_tcb_components),
            "pck_issuer_cn": self.ca_name,
            "pck_leaf_serial": hex(self.leaf.serial_number),
            "pck_leaf_not_before": self.leaf.not_valid_before_utc.isoformat(),
            "pck_leaf_not_after": self.leaf.not_valid_after_utc.isoformat(),
        }


def load_certificate_der(der: bytes, what: str) -> x509.Certificate:
    return parse_x509(lambda: [_eager(x509.load_der_x509_certificate(der))], what)[0]


def load_certificate_chain_pem(pem: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (text outside the PEM blocks, such as a final NUL, is ignored)."""
    certs = parse_x509(lambda: [_eager(c) for c in x509.load_pem_x509_certificates(pem)], what)
    if len(certs) > MAX_CHAIN_CERTS:
        raise EvidenceError(f"{what} has {len(certs)} certificates, at most {MAX_CHAIN_CERTS} are allowed")
    return certs


def parse_x509(loader: Callable[[], _T], what: str) -> _T:
    """Run ``loader`` (parse X.509 objects) turning every parse problem into ``EvidenceError``.

    ``cryptography`` only warns (CryptographyDeprecationWarning) about some
    encodings that RFC 5280 forbids, such as a serial number that is not
    positive; such an object is refused as malformed. The filter is narrow (that
    category, for this call only); ``catch_warnings`` is process-wide before
    Python 3.14, so another thread parsing at the same moment sees it too.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            return loader()
    except CryptographyDeprecationWarning as exc:
        raise EvidenceError(f"{what} is malformed: {exc}") from None
    except (ValueError, TypeError, x509.DuplicateExtension, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        # InvalidVersion is a bare Exception: an X.509 version other than 1 or 3
        raise EvidenceError(f"{what} does not parse: {exc}") from None


def _eager(cert: x509.Certificate) -> x509.Certificate:
    """Parse the lazily decoded parts now, at the boundary, not in the middle of the checks."""
    _ = (cert.subject, cert.issuer, cert.extensions, cert.serial_number, cert.not_valid_after_utc)
    _ = (cert.not_valid_before_utc, cert.public_key(), cert.signature_hash_algorithm)
    return cert


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode(errors="replace")


def verify_chain(
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    now: datetime,
    what: str,
    *,
    leaf_names: Sequence[str],
    ca_names: Sequence[str] = (),
) -> None:
    """Check ``chain`` (leaf first, optionally ending in the root) up to the pinned ``root``.

    ``leaf_names`` and ``ca_names`` are the common names allowed for the leaf
    and the intermediate CAs; any root certificate in the chain must be
    byte-identical to ``root``.
    """
    certs = list(chain)
    if certs and certs[-1] == root:
        certs.pop()
    if not certs:
        raise EvidenceError(f"{what} holds no certificate below the root")
    for cert in certs[1:]:
        if cert.issuer == cert.subject:
            raise EvidenceError(
                f"{what} ends in the root {common_name(cert)!r}, which is not the trusted root "
                f"{common_name(root)!r} (sha256 {hashlib.sha256(_der(root)).hexdigest()[:16]}...)"
            )
    if common_name(certs[0]) not in leaf_names:
        raise EvidenceError(f"{what} leaf is {common_name(certs[0])!r}, expected one of {list(leaf_names)}")
    for ca in certs[1:]:
        if common_name(ca) not in ca_names:
            raise EvidenceError(f"{what} CA is {common_name(ca)!r}, expected one of {list(ca_names)}")
    full = [*certs, root]
    for index, cert in enumerate(full):
        check_validity(cert, now, f"{what} certificate {common_name(cert)!r}")
        if index == 0:
            continue
        _check_ca(cert, cas_below=index - 1, what=f"{what} certificate {common_name(cert)!r}")
    for child, issuer in itertools.pairwise(full):
        _check_issued_by(child, issuer, what)
    _check_issued_by(root, root, what)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _check_ca(cert: x509.Certificate, *, cas_below: int, what: str) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise EvidenceError(f"{what} is not a CA: {exc}") from None
    except (ValueError, x509.DuplicateExtension) as exc:
        raise EvidenceError(f"{what} has malformed extensions: {exc}") from None
    if not constraints.ca or not usage.key_cert_sign:
        raise EvidenceError(f"{what} is not a CA certificate")
    if constraints.path_length is not None and cas_below > constraints.path_length:
        raise EvidenceError(f"{what} allows a path length of {constraints.path_length}")


def _check_issued_by(child: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        reason = str(exc) or "bad signature"
        raise EvidenceError(
            f"{what}: {common_name(child)!r} is not signed by {common_name(issuer)!r} ({reason})"
        ) from None


def ec_public_key(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EvidenceError(f"{what} public key does not parse: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise EvidenceError(f"{what} key is not an ECDSA P-256 key")
    return key


def pck_certificate(chain: Sequence[x509.Certificate]) -> PckCertificate:
    """Decode the PCK leaf's SGX extension (OID 1.2.840.113741.1.13.1); the chain is leaf first."""
    if len(chain) < 2:
        raise EvidenceError("PCK certificate chain needs at least the PCK leaf and its CA")
    leaf, ca = chain[0], chain[1]
    try:
        ext = leaf.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
    except x509.ExtensionNotFound:
        raise EvidenceError("PCK certificate lacks the SGX extension (1.2.840.113741.1.13.1)") from None
    except (ValueError, x509.DuplicateExtension) as exc:
        raise EvidenceError(f"PCK certificate extensions do not parse: {exc}") from None
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise EvidenceError("PCK certificate SGX extension has an unexpected type")
    fields = _sgx_extension(ext.value)
    tcb = _sgx_fields(_need(fields, f"{_SGX}.2", 0x30, "TCB"))
    components = tuple(
        _uint(_need(tcb, f"{_SGX}.2.{i}", 0x02, f"SGX TCB component {i}"), f"SGX TCB component {i}")
        for i in range(1, 17)
    )
    sgx_type = fields.get(f"{_SGX}.5")
    return PckCertificate(
        leaf=leaf,
        ca=ca,
        ppid=_sized(_need(fields, f"{_SGX}.1", 0x04, "PPID"), 16, "PPID"),
        fmspc=_sized(_need(fields, f"{_SGX}.4", 0x04, "FMSPC"), 6, "FMSPC"),
        pceid=_sized(_need(fields, f"{_SGX}.3", 0x04, "PCEID"), 2, "PCEID"),
        cpusvn=_sized(_need(tcb, f"{_SGX}.2.18", 0x04, "CPUSVN"), 16, "CPUSVN"),
        pcesvn=_uint(_need(tcb, f"{_SGX}.2.17", 0x02, "PCESVN"), "PCESVN"),
        sgx_tcb_components=components,
        sgx_type=_uint(sgx_type[1], "SGX type") if sgx_type is not None else None,
    )


def _need(fields: dict[str, tuple[int, bytes]], oid: str, tag: int, name: str) -> bytes:
    try:
        actual, value = fields[oid]
    except KeyError:
        raise EvidenceError(f"PCK certificate SGX extension lacks {name} ({oid})") from None
    if actual != tag:
        raise EvidenceError(
            f"PCK certificate SGX extension {name} has DER tag {actual:#x}, expected {tag:#x}"
        )
    return value


def _sized(value: bytes, size: int, name: str) -> bytes:
    if len(value) != size:
        raise EvidenceError(f"PCK certificate SGX extension {name} is {len(value)} bytes, expected {size}")
    return value


def _uint(value: bytes, name: str) -> int:
    if not value or len(value) > 3 or value[0] & 0x80:
        raise EvidenceError(f"PCK certificate SGX extension {name} is not a small non-negative integer")
    return int.from_bytes(value, "big")


def _sgx_extension(der: bytes) -> dict[str, tuple[int, bytes]]:
    """The extension value: one DER SEQUENCE of entries."""
    tag, start, end = _tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise EvidenceError("PCK certificate SGX extension is not a single DER SEQUENCE")
    return _sgx_fields(der[start:end])


def _sgx_fields(der: bytes) -> dict[str, tuple[int, bytes]]:
    """The content of a SEQUENCE OF SEQUENCE { OID, value } as {oid: (value tag, value content)}."""
    fields: dict[str, tuple[int, bytes]] = {}
    pos, end = 0, len(der)
    while pos < end:
        tag, item_start, item_end = _tlv(der, pos)
        if tag != 0x30:
            raise EvidenceError("PCK certificate SGX extension entry is not a SEQUENCE")
        oid_tag, oid_start, oid_end = _tlv(der, item_start)
        if oid_tag != 0x06:
            raise EvidenceError("PCK certificate SGX extension entry does not start with an OID")
        value_tag, value_start, value_end = _tlv(der, oid_end)
        if value_end != item_end:
            raise EvidenceError("PCK certificate SGX extension entry has extra bytes")
        oid = _oid(der[oid_start:oid_end])
        if oid in fields:
            raise EvidenceError(f"PCK certificate SGX extension repeats {oid}")
        fields[oid] = (value_tag, der[value_start:value_end])
        pos = item_end
    return fields


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``pos``, bounds-checked."""
    if pos + 2 > len(der):
        raise EvidenceError("PCK certificate SGX extension is truncated")
    tag, first = der[pos], der[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 3 or pos + count > len(der):
            raise EvidenceError("PCK certificate SGX extension has a bad DER length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > len(der):
        raise EvidenceError("PCK certificate SGX extension is truncated")
    return tag, pos, pos + length


def _oid(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise EvidenceError("PCK certificate SGX extension has a malformed OID")
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in (first, arcs[0] - 40 * first, *arcs[1:]))
