"""The ``nitro-enclave`` and ``nitro-tpm`` platforms: AWS Nitro attestation documents.

The checks, in the order AWS gives them (``attestation_process.md`` of
aws-nitro-enclaves-nsm-api), all without I/O:

1. The document parses, within every size limit (:mod:`.nitro_document`).
2. ``cabundle[0]`` is the AWS Nitro Root-G1: its SHA-256 over DER is
   :data:`AWS_NITRO_ROOT_G1_SHA256`, pinned here (only a test fixture replaces it).
3. Each certificate is issued and signed (ECDSA P-384, SHA-384) by the one
   before it, from the root through the cabundle to the document's
   ``certificate``; every CA is a CA with room in its path length; each is
   valid at the check time: the document's own timestamp (a recorded
   document), or a time the caller names.
4. The COSE_Sign1 signature (ES384) over the ``Signature1`` structure verifies
   with the ``certificate``'s P-384 key.
5. For evidence made for this call, the document's timestamp is recent
   (:data:`LIVE_MAX_AGE`; the leaf certificates live about three hours, so a
   document cannot be much older than its chain) and not from the future
   beyond :data:`CLOCK_SKEW`.

Binding: the document's ``nonce`` is the 64-byte report data, the SHA-512 of
the claims, which hold the custodian's or end user's nonce and the enclave's
public key; ``public_key`` and ``user_data`` are not used (NitroTPM takes only an
RSA ``public_key``, for AWS KMS). A debug-mode enclave (PCRs 0-2 all zero) is
refused unless the manifest allows debug. Neither platform has a register the
measurement log is replayed into: the log is bound through the nonce, and the
pinned PCRs vouch for the code that wrote it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from enclave.attestation.certificates import check_validity
from enclave.attestation.interface import Evidence, PlatformClaims, Verifier
from enclave.attestation.nitro_document import IMAGE_PCRS, AttestationDocument, parse_document
from enclave.errors import BindingError, EvidenceError

PLATFORM_ENCLAVE = "nitro-enclave"
PLATFORM_TPM = "nitro-tpm"
PLATFORMS = (PLATFORM_ENCLAVE, PLATFORM_TPM)
PART_DOCUMENT = "document"

# SHA-256 over the DER of the AWS Nitro Enclaves Root-G1 ("aws.nitro-enclaves", valid
# 2019-10-28 to 2049-10-28), the root.pem inside AWS_NitroEnclaves_Root-G1.zip whose own
# SHA-256 AWS publishes (8cf60e2b...faff7c); see ../shared/vectors/MANIFEST.md.
AWS_NITRO_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
# The roots a cabundle may start with. Only a test fixture changes it, by assignment.
TRUSTED_ROOTS_SHA256 = frozenset({AWS_NITRO_ROOT_G1_SHA256})

LIVE_MAX_AGE = timedelta(minutes=10)
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class VerifiedDocument:
    """A document whose chain and signature checked out at ``checked_at``."""

    document: AttestationDocument
    chain: tuple[x509.Certificate, ...]  # root first, the document's certificate last
    checked_at: datetime
    checks: tuple[str, ...]

    @property
    def platform(self) -> str:
        return PLATFORM_TPM if self.document.is_tpm else PLATFORM_ENCLAVE

    @property
    def debug(self) -> bool:
        """A Nitro Enclave started in debug mode: PCRs 0-2 all zero. NitroTPM has no debug mode."""
        return not self.document.is_tpm and all(not any(self.document.pcrs[i]) for i in IMAGE_PCRS)

    def registers(self) -> dict[str, bytes]:
        return {f"pcr{index}": value for index, value in self.document.pcrs.items()}

    def details(self) -> dict[str, Any]:
        out = self.document.to_dict()
        out.update(
            platform=self.platform,
            debug=self.debug,
            checked_at=self.checked_at.isoformat(),
            chain=[_describe(c) for c in self.chain],
            checks=list(self.checks),
        )
        return out


def verify_document(
    data: bytes,
    *,
    at: datetime | None = None,
    now: datetime | None = None,
    max_age: timedelta | None = None,
) -> VerifiedDocument:
    """Verify a raw Nitro attestation document; raise ``EvidenceError`` naming the first failure.

    The chain is checked at ``at``, or at the document's own timestamp when
    ``at`` is None. With ``now``, the document must not be from after ``now``
    (beyond :data:`CLOCK_SKEW`), and with ``max_age`` too, no older than that.
    """
    for when in (at, now):
        if when is not None and (when.tzinfo is None or when.utcoffset() is None):
            raise ValueError("verification times must be timezone-aware")
    document = parse_document(data)
    checked_at = at or document.timestamp
    checks: list[str] = []
    chain = _verify_chain(document, checked_at, checks)
    _verify_signature(document, chain[-1])
    checks.append("COSE_Sign1 signature (ES384) over the Signature1 structure verified with the certificate")
    if now is not None:
        checks.append(check_age(document, now=now, max_age=max_age))
    return VerifiedDocument(document=document, chain=chain, checked_at=checked_at, checks=tuple(checks))


def check_age(document: AttestationDocument, *, now: datetime, max_age: timedelta | None) -> str:
    """Refuse a document from after ``now`` (beyond the clock skew) or older than ``max_age``."""
    if document.timestamp > now + CLOCK_SKEW:
        raise EvidenceError(
            f"Nitro attestation document is from {document.timestamp.isoformat()}, after {now.isoformat()}"
        )
    if max_age is None:
        return f"timestamp {document.timestamp.isoformat()} is not after {now.isoformat()}"
    if document.timestamp < now - max_age:
        raise EvidenceError(
            f"Nitro attestation document is from {document.timestamp.isoformat()}, more than"
            f" {int(max_age.total_seconds())} s before {now.isoformat()}: not a live document"
        )
    seconds = int(max_age.total_seconds())
    return f"timestamp {document.timestamp.isoformat()} is within {seconds} s of {now.isoformat()}"


def _load(der: bytes, what: str) -> x509.Certificate:
    """A certificate whose every field the checks read parses here (cryptography parses lazily).

    What cryptography only warns about (a name attribute of the wrong length, a serial number
    that is not positive) is refused as malformed; ``catch_warnings`` is process-wide before
    Python 3.14, so another thread parsing at that moment sees the same filter.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", category=UserWarning, module=r"cryptography")
            certificate = x509.load_der_x509_certificate(der)
            _ = (certificate.subject, certificate.issuer, certificate.extensions, certificate.public_key())
            _ = (certificate.signature_hash_algorithm, certificate.not_valid_before_utc)
            _ = (certificate.not_valid_after_utc, certificate.serial_number)
    except (
        ValueError,
        TypeError,
        UnsupportedAlgorithm,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        UserWarning,
    ) as exc:
        raise EvidenceError(
            f"Nitro attestation document {what} is not a DER X.509 certificate we can read: {exc}"
        ) from None
    return certificate


def _verify_chain(
    document: AttestationDocument, when: datetime, checks: list[str]
) -> tuple[x509.Certificate, ...]:
    bundle = [_load(der, f"cabundle[{i}]") for i, der in enumerate(document.cabundle)]
    leaf = _load(document.certificate, "certificate")
    root = bundle[0]
    fingerprint = hashlib.sha256(document.cabundle[0]).hexdigest()
    if fingerprint not in TRUSTED_ROOTS_SHA256:
        raise EvidenceError(
            f"Nitro attestation document cabundle[0] (sha256 {fingerprint}) is not the pinned AWS Nitro"
            f" Root-G1 ({AWS_NITRO_ROOT_G1_SHA256})"
        )
    checks.append(
        f"cabundle[0] is the pinned AWS Nitro Root-G1 (sha256 {fingerprint})"
        if fingerprint == AWS_NITRO_ROOT_G1_SHA256
        else f"cabundle[0] is a root a test installed (sha256 {fingerprint}), NOT the AWS Nitro Root-G1"
    )
    chain = (*bundle, leaf)
    labels = [f"cabundle[{i}]" for i in range(len(bundle))] + ["certificate"]
    for index, certificate in enumerate(chain):
        issuer = chain[index - 1] if index else root
        _check_issued(certificate, issuer, labels[index], labels[index - 1] if index else "itself")
        check_validity(certificate, when, f"Nitro {labels[index]} ({_common_name(certificate)})")
        is_ca = index < len(bundle)
        constraints = _basic_constraints(certificate)
        if is_ca and (constraints is None or not constraints.ca):
            raise EvidenceError(f"Nitro {labels[index]} is not a CA certificate (basicConstraints cA)")
        if not is_ca and constraints is not None and constraints.ca:
            raise EvidenceError("Nitro attestation document certificate is a CA certificate, not a leaf")
        below = len(bundle) - 1 - index  # CAs under this one
        if is_ca and constraints is not None and constraints.path_length is not None:
            if below > constraints.path_length:
                raise EvidenceError(
                    f"Nitro {labels[index]} allows {constraints.path_length} CAs below it, not {below}"
                )
    checks.append(
        f"chain of {len(chain)} certificates (ECDSA P-384, SHA-384) from the root to the certificate,"
        f" each issued by the one before and valid at {when.isoformat()}"
    )
    return chain


def _check_issued(certificate: x509.Certificate, issuer: x509.Certificate, label: str, by: str) -> None:
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise EvidenceError(f"Nitro {by} key is not ECDSA P-384")
    if certificate.issuer != issuer.subject:
        raise EvidenceError(f"Nitro {label} is issued by {certificate.issuer.rfc4514_string()}, not {by}")
    if not isinstance(certificate.signature_hash_algorithm, hashes.SHA384):
        raise EvidenceError(f"Nitro {label} is not signed with ECDSA SHA-384")
    try:
        key.verify(certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError(f"Nitro {label} signature does not verify with {by}") from None


def _verify_signature(document: AttestationDocument, leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise EvidenceError("Nitro attestation document certificate key is not ECDSA P-384")
    r = int.from_bytes(document.signature[:48], "big")
    s = int.from_bytes(document.signature[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), document.signed_bytes(), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError(
            "Nitro attestation document signature does not verify with its certificate"
        ) from None


def _basic_constraints(certificate: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    except (x509.DuplicateExtension, ValueError):
        raise EvidenceError("Nitro certificate extensions do not parse") from None


def _common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.subject.rfc4514_string()


def _describe(certificate: x509.Certificate) -> dict[str, str]:
    return {
        "subject": certificate.subject.rfc4514_string(),
        "not_before": certificate.not_valid_before_utc.isoformat(),
        "not_after": certificate.not_valid_after_utc.isoformat(),
        "sha256": hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest(),
    }


class NitroVerifier(Verifier):
    """``Verifier`` for ``nitro-enclave`` or ``nitro-tpm`` evidence: one part, ``document``.

    ``max_age``: how old a document may be at ``now`` (None: only not from the
    future; for evidence made earlier, such as a certificate's, whose freshness
    a later nonce establishes).
    """

    def __init__(
        self,
        platform: str = PLATFORM_ENCLAVE,
        *,
        allow_debug: bool = False,
        max_age: timedelta | None = LIVE_MAX_AGE,
    ) -> None:
        if platform not in PLATFORMS:
            raise ValueError(f"a Nitro platform is one of {', '.join(PLATFORMS)}, not {platform!r}")
        self.platform = platform
        self._allow_debug = allow_debug
        self._max_age = max_age

    def verify(
        self,
        evidence: Evidence,
        *,
        report_data: bytes,
        now: datetime,
        collateral: Mapping[str, bytes] | None = None,
    ) -> PlatformClaims:
        if evidence.platform != self.platform:
            raise EvidenceError(f"expected {self.platform} evidence, got {evidence.platform!r}")
        verified = verify_document(evidence.part(PART_DOCUMENT))
        check_platform(verified, self.platform, allow_debug=self._allow_debug)
        nonce = verified.document.nonce
        if nonce is None or not hmac.compare_digest(nonce, report_data):
            raise BindingError(
                "Nitro attestation document nonce is not the expected report data: it was made for"
                " another challenge or key (a replayed document)"
            )
        # After the binding: a replayed document is named for what gives it away first.
        age = check_age(verified.document, now=now, max_age=self._max_age)
        verified = dataclasses.replace(verified, checks=(*verified.checks, age))
        return PlatformClaims(
            platform=self.platform,
            report_data=report_data,
            registers=verified.registers(),
            simulated=False,
            log_register=None,
            log_hash="sha384",
            details=verified.details(),
        )


def check_platform(verified: VerifiedDocument, platform: str, *, allow_debug: bool) -> None:
    """Refuse a document of the other Nitro platform, or a debug enclave unless ``allow_debug``."""
    if verified.platform != platform:
        raise EvidenceError(
            f"Nitro attestation document is from {verified.platform} ({verified.document.pcrs_field}),"
            f" not {platform}"
        )
    if verified.debug and not allow_debug:
        raise EvidenceError(
            "Nitro Enclave runs in debug mode (PCRs 0-2 all zero), and the manifest does not allow debug"
        )
