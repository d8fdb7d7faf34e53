"""AMD SEV-SNP certificates: loading them within limits, and reading the VCEK/VLEK's AMD extensions.

No signature is checked here (``sev_snp`` does that); every malformed input
raises ``EvidenceError`` naming what was wrong.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from enclave.attestation.sev_snp_report import SigningKey
from enclave.errors import EvidenceError

MAX_CERT_INPUT_BYTES = 64 * 1024
MAX_CERTS = 8

_AMD = "1.3.6.1.4.1.3704.1"
OID_PRODUCT_NAME = x509.ObjectIdentifier(f"{_AMD}.2")
OID_HWID = x509.ObjectIdentifier(f"{_AMD}.4")
OID_CSP_ID = x509.ObjectIdentifier(f"{_AMD}.5")
TCB_OIDS: Mapping[str, x509.ObjectIdentifier] = MappingProxyType(
    {
        "bootloader": x509.ObjectIdentifier(f"{_AMD}.3.1"),
        "tee": x509.ObjectIdentifier(f"{_AMD}.3.2"),
        "snp": x509.ObjectIdentifier(f"{_AMD}.3.3"),
        "microcode": x509.ObjectIdentifier(f"{_AMD}.3.8"),
        "fmc": x509.ObjectIdentifier(f"{_AMD}.3.9"),
    }
)


@dataclass(frozen=True)
class EndorsementKey:
    """A VCEK or VLEK certificate and the AMD extensions it carries."""

    kind: SigningKey
    certificate: x509.Certificate
    product_name: str | None  # e.g. "Milan-B0", "Genoa", "Turin"
    hwid: bytes | None  # VCEK only
    tcb: Mapping[str, int]  # component name -> SPL, from the .3.x extensions present
    csp_id: str | None  # VLEK only


def endorsement_key(cert: x509.Certificate, kind: SigningKey) -> EndorsementKey:
    """Read the AMD extensions of a VCEK or VLEK certificate."""
    name = kind.name
    tcb: dict[str, int] = {}
    for component, oid in TCB_OIDS.items():
        value = _extension(cert, oid, name)
        if value is not None:
            tcb[component] = _der_small_int(value, f"{name} {component} TCB extension")
    product_name = _extension(cert, OID_PRODUCT_NAME, name)
    csp_id = _extension(cert, OID_CSP_ID, name)
    hwid = _extension(cert, OID_HWID, name)
    if hwid is not None and len(hwid) in (10, 66) and hwid[0] == 0x04 and hwid[1] == len(hwid) - 2:
        hwid = hwid[2:]  # newer KDS certificates wrap hwID in a DER OCTET STRING
    return EndorsementKey(
        kind=kind,
        certificate=cert,
        product_name=None if product_name is None else _der_ia5(product_name, f"{name} productName"),
        hwid=hwid,
        tcb=MappingProxyType(tcb),
        csp_id=None if csp_id is None else _der_ia5(csp_id, f"{name} CSP_ID"),
    )


@contextmanager
def zero_serial_tolerated() -> Iterator[None]:
    """Silence only cryptography's warning about a non-positive serial number.

    AMD KDS issues every VCEK with serial number 0, which RFC 5280 forbids;
    cryptography (48 and later) warns when it parses one and may refuse it in a
    future release (``load_certificates`` then raises ``EvidenceError``). The
    filter is scoped to this block and to that one message, so every other
    warning still surfaces. ``catch_warnings`` swaps the process-wide filter
    list, so a warning filter another thread installs meanwhile is undone.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"Parsed a serial number which wasn't positive",
            category=CryptographyDeprecationWarning,
        )
        yield


def load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    if not isinstance(data, bytes | bytearray):
        raise EvidenceError(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > MAX_CERT_INPUT_BYTES:
        raise EvidenceError(f"{what} is {len(data)} bytes, over the {MAX_CERT_INPUT_BYTES}-byte limit")
    data = bytes(data)
    try:
        with zero_serial_tolerated():
            if data.lstrip().startswith(b"-----BEGIN"):
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is not a ValueError
        raise EvidenceError(f"{what} does not parse as an X.509 certificate (DER or PEM): {exc}") from None
    if len(certs) > MAX_CERTS:
        raise EvidenceError(f"{what} holds {len(certs)} certificates, more than {MAX_CERTS}")
    return certs


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else ""


def sha256_fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _extension(cert: x509.Certificate, oid: x509.ObjectIdentifier, what: str) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension) as exc:  # malformed or duplicated extensions
        raise EvidenceError(f"{what} extensions do not parse: {exc}") from None
    if not isinstance(value, x509.UnrecognizedExtension):
        raise EvidenceError(f"{what} extension {oid.dotted_string} has an unexpected type")
    return value.value


def _der_small_int(value: bytes, what: str) -> int:
    """A DER INTEGER of 0..255 (the TCB security patch levels)."""
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2 or value[1] > 2:
        raise EvidenceError(f"{what} is not a small DER INTEGER: {value.hex()}")
    number = int.from_bytes(value[2:], "big", signed=True)
    if not 0 <= number <= 0xFF:
        raise EvidenceError(f"{what} is {number}, outside 0..255")
    return number


def _der_ia5(value: bytes, what: str) -> str:
    if len(value) < 2 or value[0] != 0x16 or value[1] != len(value) - 2 or value[1] >= 0x80:
        raise EvidenceError(f"{what} is not a short DER IA5String: {value.hex()}")
    try:
        return value[2:].decode("ascii")
    except UnicodeDecodeError:
        raise EvidenceError(f"{what} is not ASCII") from None
