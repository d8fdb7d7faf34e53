"""The TPM attestation key (AK): loading it in its several encodings, and trusting it by certificate.

An AK arrives as a ``TPMT_PUBLIC`` (go-tpm-tools, go-attestation), a
SubjectPublicKeyInfo in DER or PEM (trustee, keylime), or a JWK (the
``HCLAkPub`` of an Azure confidential VM). A ``TPMT_PUBLIC`` also tells what
kind of key it is, so it must describe a restricted signing key the TPM made
and never lets go (restricted, sign, fixedTPM, fixedParent,
sensitiveDataOrigin; not decrypt): only such a key is guaranteed to sign
nothing but genuine TPM-generated structures. A bare key says none of that.

Trusting the AK by certificate: the AK must be a ``TPMT_PUBLIC`` (a bare key
could be any software key), and its certificate must be an AK certificate
(extended key usage tcg-kp-AIKCertificate, and neither clientAuth nor
serverAuth: a TLS certificate for the same key proves nothing about a TPM),
carry exactly the AK's public key and chain, through intermediates, to one of
the caller's roots, every certificate valid at ``now``. Revocation is not
checked (no CRL is fetched; verification does no I/O).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from enclave.attestation import tpm_chain
from enclave.attestation.certificates import check_validity
from enclave.attestation.tpm_structures import (
    TPMA_OBJECT_DECRYPT,
    TPMA_OBJECT_FIXED_PARENT,
    TPMA_OBJECT_FIXED_TPM,
    TPMA_OBJECT_RESTRICTED,
    TPMA_OBJECT_SENSITIVE_DATA_ORIGIN,
    TPMA_OBJECT_SIGN,
    TpmPublic,
    parse_public,
)
from enclave.errors import EvidenceError

AkPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

MAX_AK_BYTES = 16 * 1024
MAX_CERTIFICATE_BYTES = 64 * 1024
MAX_CHAIN_DEPTH = 4
_JWK_CURVES: Mapping[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
# TCG EK Credential Profile: the extended key usage of an AK (AIK) certificate.
TCG_KP_AIK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.3")
# Usages that make a certificate something else than an AK certificate (a TLS client or server
# certificate for the same key would otherwise pass as one).
_FOREIGN_USAGES = {
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


@dataclass(frozen=True)
class AttestationKey:
    """The AK's public key, how it was encoded, and its ``TPMT_PUBLIC`` where that was given."""

    key: AkPublicKey
    encoding: str  # "tpmt_public" | "spki" | "jwk"
    tpm_public: TpmPublic | None = None

    def spki(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def load_ak(data: bytes) -> AttestationKey:
    """An AK from a TPMT_PUBLIC, a DER or PEM SubjectPublicKeyInfo, or a JWK (JSON)."""
    if len(data) > MAX_AK_BYTES:
        raise EvidenceError(f"AK is {len(data)} bytes, over the {MAX_AK_BYTES}-byte limit")
    data = bytes(data)
    stripped = data.lstrip()
    if stripped.startswith(b"-----BEGIN"):
        return _from_spki(data, pem=True)
    if stripped.startswith(b"{"):
        return ak_from_jwk(json_object(data, "AK JWK"))
    if data[:1] == b"\x30":
        return _from_spki(data, pem=False)
    public = parse_public(data)
    _check_ak_attributes(public)
    return AttestationKey(key=public.public_key(), encoding="tpmt_public", tpm_public=public)


def _from_spki(data: bytes, *, pem: bool) -> AttestationKey:
    try:
        key = serialization.load_pem_public_key(data) if pem else serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EvidenceError(f"AK SubjectPublicKeyInfo does not parse: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise EvidenceError(f"AK is a {type(key).__name__}, not an RSA or EC key")
    return AttestationKey(key=key, encoding="spki")


def _check_ak_attributes(public: TpmPublic) -> None:
    required = {
        "restricted": TPMA_OBJECT_RESTRICTED,
        "sign": TPMA_OBJECT_SIGN,
        "fixedTPM": TPMA_OBJECT_FIXED_TPM,
        "fixedParent": TPMA_OBJECT_FIXED_PARENT,
        "sensitiveDataOrigin": TPMA_OBJECT_SENSITIVE_DATA_ORIGIN,
    }
    missing = [name for name, bit in required.items() if not public.has(bit)]
    if missing or public.has(TPMA_OBJECT_DECRYPT):
        raise EvidenceError(
            f"AK objectAttributes {public.object_attributes:#010x} are not those of a restricted signing "
            f"key made in and fixed to its TPM (missing: {', '.join(missing) or 'none'}; "
            "decrypt must be clear)"
        )


def ak_from_jwk(jwk: Mapping[str, Any]) -> AttestationKey:
    """An AK from a parsed JWK: ``kty`` RSA (``n``, ``e``) or EC (``crv`` P-256/P-384, ``x``, ``y``)."""
    kty = jwk.get("kty")
    try:
        if kty == "RSA":
            n, e = _b64url_int(jwk, "n"), _b64url_int(jwk, "e")
            return AttestationKey(key=rsa.RSAPublicNumbers(e, n).public_key(), encoding="jwk")
        if kty == "EC":
            curve = _JWK_CURVES.get(str(jwk.get("crv")))
            if curve is None:
                raise EvidenceError(f"AK JWK curve {jwk.get('crv')!r} is not P-256 or P-384")
            x, y = _b64url_int(jwk, "x"), _b64url_int(jwk, "y")
            return AttestationKey(key=ec.EllipticCurvePublicNumbers(x, y, curve).public_key(), encoding="jwk")
    except ValueError as exc:
        raise EvidenceError(f"AK JWK is not a valid {kty} key: {exc}") from None
    raise EvidenceError(f"AK JWK kty {kty!r} is not RSA or EC")


def _b64url_int(jwk: Mapping[str, Any], member: str) -> int:
    value = jwk.get(member)
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise EvidenceError(f"AK JWK member {member!r} is missing or not a short string")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise EvidenceError(f"AK JWK member {member!r} is not base64url") from None
    return int.from_bytes(raw, "big")


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """Strict JSON for evidence (JWKs, PCR values, Azure runtime data): one object, no repeated names.

    Deep nesting is refused rather than crashing; every failure is an ``EvidenceError``.
    """

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise EvidenceError(f"{what} repeats a member name")
        return dict(pairs)

    try:
        doc = json.loads(data, object_pairs_hook=unique)
    except (ValueError, RecursionError) as exc:
        raise EvidenceError(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EvidenceError(f"{what} is not a JSON object")
    return doc


def load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    """Certificates from a PEM bundle or one DER certificate."""
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise EvidenceError(f"{what} is {len(data)} bytes, over the {MAX_CERTIFICATE_BYTES}-byte limit")
    try:
        if bytes(data).lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificates(bytes(data))
        return [x509.load_der_x509_certificate(bytes(data))]
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is not a ValueError
        raise EvidenceError(f"{what} does not parse as X.509: {exc}") from None


def verify_ak_certificate(
    certificate: x509.Certificate,
    ak: AttestationKey,
    *,
    roots: Sequence[x509.Certificate],
    intermediates: Iterable[x509.Certificate] = (),
    now: datetime,
) -> list[x509.Certificate]:
    """Check that ``certificate`` is an AK certificate for ``ak`` and chains to one of ``roots`` at ``now``.

    ``ak`` must be a ``TPMT_PUBLIC`` (its attributes were checked when it was loaded).
    Returns the chain, leaf first, ending with the root. Raises ``EvidenceError``.
    """
    if not roots:
        raise EvidenceError("no AK certificate roots are configured")
    if ak.tpm_public is None:
        raise EvidenceError(
            f"AK is a bare {ak.encoding} key, not a TPMT_PUBLIC: nothing shows it is a restricted "
            "signing key of a TPM, so no AK certificate can vouch for it"
        )
    when = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    try:
        leaf_key = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EvidenceError(f"AK certificate public key does not parse: {exc}") from None
    if leaf_key != ak.spki():
        raise EvidenceError("AK certificate is for another key than the AK that signed the quote")
    if tpm_chain.is_ca(certificate):
        raise EvidenceError("AK certificate is a CA certificate")
    check_aik_usage(certificate)
    check_validity(certificate, when, "AK certificate")
    return tpm_chain.walk_chain(
        certificate, roots=roots, intermediates=intermediates, when=when, role="AK", max_depth=MAX_CHAIN_DEPTH
    )


def check_aik_usage(certificate: x509.Certificate) -> None:
    """Require the AK certificate's extended key usage: tcg-kp-AIKCertificate, and no TLS usage."""
    usage = tpm_chain.extension(certificate, x509.ExtendedKeyUsage)
    if usage is None:
        raise EvidenceError(
            "AK certificate has no extended key usage: an AK certificate carries tcg-kp-AIKCertificate "
            f"({TCG_KP_AIK_CERTIFICATE.dotted_string})"
        )
    foreign = [name for oid, name in _FOREIGN_USAGES.items() if oid in usage]
    if foreign:
        raise EvidenceError(
            f"AK certificate has the extended key usage {', '.join(foreign)}: it is a TLS certificate, "
            "not an AK certificate"
        )
    if TCG_KP_AIK_CERTIFICATE not in usage:
        found = ", ".join(oid.dotted_string for oid in usage) or "none"
        raise EvidenceError(
            f"AK certificate's extended key usage ({found}) lacks tcg-kp-AIKCertificate "
            f"({TCG_KP_AIK_CERTIFICATE.dotted_string})"
        )
