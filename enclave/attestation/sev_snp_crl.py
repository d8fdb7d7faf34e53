"""AMD's certificate revocation list for an SEV-SNP chain: checked without I/O.

AMD KDS publishes one CRL per product and key kind (``/vcek/v1/<product>/crl``,
``/vlek/v1/<product>/crl``), DER, issued and signed by the product's ARK with
RSASSA-PSS (SHA-384, MGF1-SHA-384, 48-byte salt), like every certificate of
the chain. It lists the ASKs/ASVKs the ARK has revoked. The check here:

1. the CRL parses (DER or PEM), within a byte limit, before any cryptography;
2. its issuer is the ARK the chain was verified to, and its signature
   verifies with that ARK's key under RSASSA-PSS SHA-384;
3. it is current: ``thisUpdate <= now < nextUpdate`` (a CRL without
   nextUpdate cannot be judged fresh and is refused);
4. neither the ASK/ASVK nor the VCEK/VLEK serial number is listed.

A CRL that is given but fails any step refuses the evidence: a stale or badly
signed CRL is never read as "nothing revoked".
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from enclave.errors import EvidenceError

COLLATERAL_CRL = "crl"  # the ARK-signed CRL, DER or PEM: collateral or evidence part
MAX_CRL_BYTES = 256 * 1024
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """Parse an AMD CRL (DER or PEM) within ``MAX_CRL_BYTES``; raise ``EvidenceError`` otherwise."""
    if not isinstance(data, bytes | bytearray):
        raise EvidenceError(f"AMD CRL must be bytes, not {type(data).__name__}")
    if len(data) > MAX_CRL_BYTES:
        raise EvidenceError(f"AMD CRL is {len(data)} bytes, over the {MAX_CRL_BYTES}-byte limit")
    data = bytes(data)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise EvidenceError(f"AMD CRL does not parse (DER or PEM): {exc}") from None


def check_crl(
    crl_bytes: bytes,
    *,
    ark: x509.Certificate,
    revocable: tuple[tuple[x509.Certificate, str], ...],
    now: datetime,
) -> str:
    """Check the ARK-signed CRL and that no certificate in ``revocable`` is on it.

    ``revocable`` pairs each certificate (the ASK/ASVK, the VCEK/VLEK) with the
    label used in messages. Returns a sentence saying what was established;
    raises ``EvidenceError`` naming the first failure.
    """
    crl = load_crl(crl_bytes)
    ark_name = _common_name(ark.subject)
    if crl.issuer != ark.subject:
        raise EvidenceError(
            f"AMD CRL is issued by {crl.issuer.rfc4514_string()!r}, not {ark.subject.rfc4514_string()!r}"
        )
    if crl.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        raise EvidenceError("AMD CRL is not signed with RSASSA-PSS")
    try:
        digest = crl.signature_hash_algorithm
    except UnsupportedAlgorithm:
        digest = None
    if not isinstance(digest, hashes.SHA384):
        raise EvidenceError("AMD CRL signature does not use SHA-384")
    key = ark.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise EvidenceError(f"{ark_name} key is not RSA")
    try:
        key.verify(crl.signature, crl.tbs_certlist_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        raise EvidenceError(f"AMD CRL signature does not verify with {ark_name}") from None
    this_update, next_update = crl.last_update_utc, crl.next_update_utc
    if next_update is None:
        raise EvidenceError("AMD CRL has no nextUpdate: its freshness cannot be judged")
    if now < this_update:
        raise EvidenceError(
            f"AMD CRL is not yet valid at {now.isoformat()}: thisUpdate {this_update.isoformat()}"
        )
    if now >= next_update:
        raise EvidenceError(
            f"AMD CRL is stale at {now.isoformat()}: its nextUpdate was {next_update.isoformat()}"
        )
    for certificate, label in revocable:
        entry = crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
        if entry is not None:
            raise EvidenceError(
                f"{label} (serial {certificate.serial_number}) is revoked by {ark_name}'s CRL "
                f"since {entry.revocation_date_utc.isoformat()}"
            )
    labels = " and ".join(label for _, label in revocable)
    return (
        f"AMD CRL signed by {ark_name} (RSA-PSS SHA-384), current until {next_update.isoformat()}; "
        f"{labels} not revoked"
    )


def _common_name(name: x509.Name) -> str:
    names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else name.rfc4514_string()
