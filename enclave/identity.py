"""The enclave's identity key and its attested TLS certificate.

The inference endpoint presents a self-signed certificate for the enclave's
identity key (P-256, generated in memory at start). The certificate carries the
evidence and claims in a private X.509 extension, so a client can appraise the
enclave from the handshake alone and then pin that exact certificate.
"""

from __future__ import annotations

import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave.errors import FormatError

# 2.25.<UUID as integer>: an OID under the UUID arc, needs no registration.
ATTESTATION_EXTENSION_OID = x509.ObjectIdentifier("2.25.250135432497340468432233093960383557153")
# The name every attested enclave certificate carries; clients pin the certificate itself.
ENCLAVE_TLS_NAME = "enclave.custos"
MAX_CERTIFICATE_BYTES = 512 * 1024
CERT_VALIDITY = datetime.timedelta(days=7)


def generate_identity_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_key_der(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(public_der: bytes) -> str:
    return hashlib.sha256(public_der).hexdigest()


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _der_octet_string(value: bytes) -> bytes:
    return b"\x04" + _der_length(len(value)) + value


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_read(data: bytes, offset: int, tag: int) -> tuple[bytes, int]:
    if offset + 2 > len(data) or data[offset] != tag:
        raise FormatError("attestation extension is malformed")
    first = data[offset + 1]
    offset += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or offset + count > len(data):
            raise FormatError("attestation extension is malformed")
        length = int.from_bytes(data[offset : offset + count], "big")
        offset += count
    if offset + length > len(data):
        raise FormatError("attestation extension is truncated")
    return data[offset : offset + length], offset + length


def encode_attestation(evidence: bytes, claims: bytes) -> bytes:
    """DER: SEQUENCE { evidence OCTET STRING, claims OCTET STRING }."""
    body = _der_octet_string(evidence) + _der_octet_string(claims)
    return b"\x30" + _der_length(len(body)) + body


def decode_attestation(value: bytes) -> tuple[bytes, bytes]:
    body, end = _der_read(value, 0, 0x30)
    if end != len(value):
        raise FormatError("attestation extension has trailing bytes")
    evidence, offset = _der_read(body, 0, 0x04)
    claims, offset = _der_read(body, offset, 0x04)
    if offset != len(body):
        raise FormatError("attestation extension has trailing fields")
    return evidence, claims


def attested_certificate(
    key: ec.EllipticCurvePrivateKey, evidence: bytes, claims: bytes, *, now: datetime.datetime
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ENCLAVE_TLS_NAME)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(ENCLAVE_TLS_NAME)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ATTESTATION_EXTENSION_OID, encode_attestation(evidence, claims)),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def read_attested_certificate(pem: bytes) -> tuple[x509.Certificate, bytes, bytes, bytes]:
    """Parse an enclave certificate: (certificate, public key DER, evidence, claims)."""
    if len(pem) > MAX_CERTIFICATE_BYTES:
        raise FormatError("enclave certificate is too large")
    try:
        cert = x509.load_pem_x509_certificate(pem)
        extension = cert.extensions.get_extension_for_oid(ATTESTATION_EXTENSION_OID)
    except x509.ExtensionNotFound:
        raise FormatError("enclave certificate carries no attestation extension") from None
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is not a ValueError
        raise FormatError(f"enclave certificate does not parse: {exc}") from exc
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise FormatError("attestation extension has an unexpected type")
    evidence, claims = decode_attestation(value.value)
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise FormatError("enclave certificate key is not an EC key")
    return cert, public_key_der(public), evidence, claims
