"""Certificate chains of TPM keys (AK and EK certificates), walked without I/O.

Certificates are named by fingerprint, not subject: reading a Name makes
``cryptography`` warn about the over-long common names of Google's TPM CAs,
and EK certificates often have an empty subject.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from enclave.attestation.certificates import check_validity
from enclave.errors import EvidenceError

MAX_CHAIN_DEPTH = 4

_E = TypeVar("_E", x509.BasicConstraints, x509.KeyUsage, x509.ExtendedKeyUsage)


def label(certificate: x509.Certificate) -> str:
    return f"sha256:{certificate.fingerprint(hashes.SHA256()).hex()[:16]}"


def extension(certificate: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise EvidenceError(f"certificate {label(certificate)} has malformed extensions: {exc}") from None


def is_ca(certificate: x509.Certificate) -> bool:
    constraints = extension(certificate, x509.BasicConstraints)
    return constraints is not None and constraints.ca


def walk_chain(
    leaf: x509.Certificate,
    *,
    roots: Sequence[x509.Certificate],
    intermediates: Iterable[x509.Certificate],
    when: datetime,
    role: str,
    max_depth: int = MAX_CHAIN_DEPTH,
) -> list[x509.Certificate]:
    """From ``leaf`` (already checked by the caller) up to one of ``roots``, every link valid at
    ``when`` and every intermediate a CA within its path length. ``role`` ("AK", "EK") names the
    chain in errors. Returns the chain, leaf first, ending with the root."""
    root_ders = {root.public_bytes(serialization.Encoding.DER) for root in roots}
    candidates = [*roots, *intermediates]
    chain = [leaf]
    current = leaf
    for depth in range(max_depth + 1):
        issuer = _find_issuer(current, candidates)
        if issuer is None:
            raise EvidenceError(
                f"{role} certificate chain stops at {label(current)}: "
                "no trusted root or supplied intermediate issued it"
            )
        check_validity(issuer, when, f"{role} chain certificate {label(issuer)}")
        chain.append(issuer)
        if issuer.public_bytes(serialization.Encoding.DER) in root_ders:
            return chain
        _check_intermediate(issuer, depth, role)
        current = issuer
    raise EvidenceError(f"{role} certificate chain is longer than {max_depth} intermediates")


def _find_issuer(
    certificate: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in candidates:
        try:  # also checks that the issuer name matches the candidate's subject
            certificate.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return candidate
    return None


def _check_intermediate(certificate: x509.Certificate, below: int, role: str) -> None:
    """An intermediate ``below`` other intermediates from the leaf: a CA that may sign certificates."""
    name = label(certificate)
    constraints = extension(certificate, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise EvidenceError(f"{role} chain certificate {name} is not a CA")
    if constraints.path_length is not None and constraints.path_length < below:
        raise EvidenceError(f"{role} chain certificate {name} exceeds its path length constraint")
    usage = extension(certificate, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise EvidenceError(f"{role} chain certificate {name} may not sign certificates")
