"""Verify an Intel DCAP quote (SGX v3, TDX v4/v5): signature chain, collateral, TCB status.

:func:`verify_quote` is the step-by-step check shared by the ``tdx`` and
``sgx`` verifiers and usable on its own (an evidence viewer): it does not
compare report data. It raises ``EvidenceError`` naming the first check that
failed; on success it returns the parsed quote with the list of checks done
and the checks not done (collateral that was not given).

1. Parse the quote (:mod:`enclave.attestation.dcap_quote`) and the collateral
   names (:mod:`enclave.attestation.dcap_collateral`) before any cryptography.
2. PCK chain: PCK leaf <- Intel SGX PCK Platform/Processor CA <- the pinned
   Intel SGX Root CA (or the caller's ``trust_anchor``), valid at ``now``.
3. QE report signed by the PCK leaf; QE REPORTDATA = sha256(attestation key ||
   QE auth data) || 32 zero bytes.
4. Quote signed by the attestation key over header || body.
5. Collateral, each piece when given: Root CA CRL (signed by the root, PCK CA
   not revoked), PCK CRL (signed by the PCK CA, leaf not revoked), TCB info and
   QE identity (signed over their exact JSON text by an Intel SGX TCB Signing
   certificate that chains to the root and is not revoked), all fresh at
   ``now`` (expired collateral is refused unless ``accept_expired_collateral``);
   FMSPC and PCEID of the TCB info equal the PCK certificate's.
6. TCB status (:mod:`enclave.attestation.dcap_tcb`): "no matching TCB level"
   and Revoked are refused; any other status is returned for the caller's policy.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from enclave.attestation import dcap_tcb
from enclave.attestation.dcap_checks import CollateralCheck
from enclave.attestation.dcap_collateral import COLLATERAL_NAMES, parse_collateral
from enclave.attestation.dcap_freshness import carried_collateral, fresher
from enclave.attestation.dcap_pck import (
    INTEL_SGX_ROOT_CA_DER,
    PCK_CA_CNS,
    PCK_LEAF_CN,
    PckCertificate,
    common_name,
    ec_public_key,
    load_certificate_chain_pem,
    load_certificate_der,
    pck_certificate,
    verify_chain,
)
from enclave.attestation.dcap_quote import Quote, decode_quote_text, parse_quote
from enclave.attestation.dcap_tcb import TcbAssessment
from enclave.attestation.interface import Evidence, PlatformClaims, Verifier
from enclave.errors import BindingError, EvidenceError

__all__ = [
    "COLLATERAL_NAMES",
    "INTEL_SGX_ROOT_CA_DER",
    "DcapVerifier",
    "QuoteVerification",
    "decode_quote_text",
    "parse_quote",
    "verify_quote",
]

# Why a check was not done, by check name, when its collateral is missing.
_NOT_DONE = {
    "root_ca_crl": "no 'root_ca_crl' collateral: revocation of the PCK CA and TCB Signing certificates",
    "pck_crl": "no 'pck_crl' collateral: revocation of the PCK certificate",
    "tcb_info": "no 'tcb_info' collateral: platform TCB status, FMSPC/PCEID match and TDX module identity",
    "qe_identity": "no 'qe_identity' collateral: QE identity (MRSIGNER, ISVPRODID, ...) and QE TCB status",
}


@dataclass(frozen=True)
class QuoteVerification:
    """A quote whose signature chain checked out, with what was and was not checked."""

    quote: Quote
    pck: PckCertificate
    tcb: TcbAssessment | None
    checks_done: tuple[str, ...]
    checks_not_done: Mapping[str, str]
    warnings: tuple[str, ...]
    # Whose copy of each collateral piece was used: the evidence's or the relying party's.
    collateral_sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def tcb_status(self) -> str | None:
        return self.tcb.status if self.tcb is not None else None

    @property
    def registers(self) -> dict[str, bytes]:
        return self.quote.body.registers()

    def details(self) -> dict[str, Any]:
        """Every parsed field (bytes as hex) plus TCB status and the checks, for display and policy."""
        quote = self.quote
        out: dict[str, Any] = {
            "format": quote.format_name,
            "header": _hexed(vars(quote.header)),
            "body": _hexed(vars(quote.body)),
            "qe_report": _hexed(vars(quote.qe_report)),
            "attestation_key": quote.attestation_key.hex(),
            "quote_bytes_used": quote.size,
            "trailing_bytes": quote.trailing_bytes,
            "debug": quote.body.debug,
            **self.pck.details(),
            "tcb_status": None,
            "advisory_ids": [],
            "checks_done": list(self.checks_done),
            "checks_not_done": dict(self.checks_not_done),
            "warnings": list(self.warnings),
            "collateral_sources": dict(self.collateral_sources),
        }
        if self.tcb is not None:
            out.update(self.tcb.details())
        return out


def verify_quote(
    quote: bytes,
    *,
    now: datetime,
    collateral: Mapping[str, bytes] | None = None,
    carried_collateral: Mapping[str, bytes] | None = None,
    trust_anchor: bytes | None = None,
    accept_expired_collateral: bool = False,
    min_tcb_evaluation_data_number: int | None = None,
) -> QuoteVerification:
    """Verify a raw DCAP quote at ``now`` without comparing its report data.

    ``collateral`` (the caller's own) and ``carried_collateral`` (what the
    evidence carried) map the names in :data:`COLLATERAL_NAMES` to bytes (see
    :mod:`enclave.attestation.dcap_collateral`); piece by piece the fresher copy
    is used (:mod:`enclave.attestation.dcap_freshness`). ``trust_anchor`` is a
    root CA certificate (DER or PEM) replacing the pinned Intel SGX Root CA.
    """
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    parsed = parse_quote(quote)
    pieces, sources = fresher(parse_collateral(carried_collateral), parse_collateral(collateral))
    root = _trust_anchor(trust_anchor)
    done: list[str] = []
    warnings: list[str] = []

    pck = _verify_pck_chain(parsed, root, now)
    done.append("pck_chain")
    _verify_qe_report(parsed, pck)
    done += ["qe_report_signature", "qe_report_binding"]
    _verify_quote_signature(parsed)
    done.append("quote_signature")
    if parsed.body.debug:
        warnings.append("DEBUG enclave: the host can read and change its memory; it protects nothing")

    check = CollateralCheck(
        parsed,
        pck,
        root,
        now,
        accept_expired_collateral,
        done,
        warnings,
        min_evaluation_number=min_tcb_evaluation_data_number,
    )
    tcb = check.run(pieces)
    return QuoteVerification(
        quote=parsed,
        pck=pck,
        tcb=tcb,
        checks_done=tuple(done),
        checks_not_done={name: why for name, why in _NOT_DONE.items() if name not in done},
        warnings=tuple(warnings),
        collateral_sources=sources,
    )


def _trust_anchor(anchor: bytes | None) -> x509.Certificate:
    if anchor is None:
        return load_certificate_der(INTEL_SGX_ROOT_CA_DER, "Intel SGX Root CA")
    if anchor.lstrip().startswith(b"-----BEGIN"):
        certs = load_certificate_chain_pem(anchor, "trust anchor")
        if len(certs) != 1:
            raise EvidenceError("trust anchor PEM must hold exactly one certificate")
        return certs[0]
    return load_certificate_der(anchor, "trust anchor")


def _verify_pck_chain(quote: Quote, root: x509.Certificate, now: datetime) -> PckCertificate:
    chain = load_certificate_chain_pem(quote.pck_chain_pem, "PCK certificate chain")
    verify_chain(chain, root, now, "PCK certificate chain", leaf_names=(PCK_LEAF_CN,), ca_names=PCK_CA_CNS)
    below_root = chain[:-1] if chain and chain[-1] == root else chain
    if len(below_root) != 2:
        raise EvidenceError(
            "PCK certificate chain must be the PCK certificate and its CA (then optionally the root), "
            f"got {[common_name(c) for c in chain]}"
        )
    return pck_certificate(below_root)


def _verify_qe_report(quote: Quote, pck: PckCertificate) -> None:
    key = ec_public_key(pck.leaf, "PCK certificate")
    _verify_raw_signature(
        key, quote.qe_report_signature, quote.qe_report_bytes, "QE report signature (PCK key)"
    )
    expected = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if quote.qe_report.reportdata != expected:
        raise EvidenceError(
            "QE report data is not sha256(attestation key || QE auth data): key not bound to the QE"
        )


def _verify_quote_signature(quote: Quote) -> None:
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + quote.attestation_key)
    except ValueError:
        raise EvidenceError("attestation key is not a P-256 point") from None
    _verify_raw_signature(key, quote.signature, quote.signed_bytes, "quote signature (attestation key)")


def _verify_raw_signature(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes, what: str) -> None:
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EvidenceError(f"{what} does not verify") from None


def _hexed(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.hex() if isinstance(v, bytes) else v for k, v in fields.items() if v is not None}


class DcapVerifier(Verifier):
    """The ``tdx`` and ``sgx`` verifiers: :func:`verify_quote` on ``evidence.parts["quote"]``, then policy.

    ``accepted_tcb_statuses`` applies to the overall TCB status when TCB info
    is given (Revoked and "no matching TCB level" are always refused). A debug
    enclave or TD protects nothing from the host, so it is refused unless
    ``allow_debug``. The evidence may carry collateral (parts named
    ``collateral.<name>``); ``collateral`` is the caller's own, and the fresher
    copy of each piece is used. ``min_tcb_evaluation_data_number`` refuses TCB
    info and QE identity from before that TCB evaluation.
    ``accept_expired_collateral`` turns expired TCB info, QE identity and CRLs
    into warnings (for replaying old evidence). Last, the
    quote's report data must equal ``report_data`` (``BindingError``).
    """

    platform: str
    log_register: str | None
    log_hash: str

    def __init__(
        self,
        *,
        trust_anchor: bytes | None = None,
        accepted_tcb_statuses: Iterable[str] = dcap_tcb.NON_TERMINAL_STATUSES,
        allow_debug: bool = False,
        accept_expired_collateral: bool = False,
        min_tcb_evaluation_data_number: int | None = None,
    ) -> None:
        self.trust_anchor = trust_anchor
        self.accepted_tcb_statuses = frozenset(accepted_tcb_statuses)
        self.allow_debug = allow_debug
        self.accept_expired_collateral = accept_expired_collateral
        self.min_tcb_evaluation_data_number = min_tcb_evaluation_data_number

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
        result = verify_quote(
            evidence.part("quote"),
            now=now,
            collateral=collateral,
            carried_collateral=carried_collateral(evidence.parts),
            trust_anchor=self.trust_anchor,
            accept_expired_collateral=self.accept_expired_collateral,
            min_tcb_evaluation_data_number=self.min_tcb_evaluation_data_number,
        )
        quote = result.quote
        if quote.is_tdx != (self.platform == "tdx"):
            raise EvidenceError(f"{self.platform} evidence holds a {'TDX' if quote.is_tdx else 'SGX'} quote")
        if quote.body.debug and not self.allow_debug:
            kind = "TD" if quote.is_tdx else "enclave"
            raise EvidenceError(f"the quote is from a DEBUG {kind}, which protects nothing")
        status = result.tcb_status
        if status is not None and status not in self.accepted_tcb_statuses:
            accepted = sorted(self.accepted_tcb_statuses)
            raise EvidenceError(f"TCB status {status} is not accepted (accepted: {accepted})")
        if not hmac.compare_digest(quote.report_data, report_data):
            raise BindingError("quote report data does not match the expected report data")
        details = result.details()
        details["checks_done"].append("report_data")
        return PlatformClaims(
            platform=self.platform,
            report_data=quote.report_data,
            registers=result.registers,
            simulated=False,
            log_register=self._log_register(result.registers),
            log_hash=self.log_hash,
            details=details,
        )

    def _log_register(self, registers: Mapping[str, bytes]) -> str | None:
        """The register the measurement log must replay to, or None where the log is bound only
        through the report data (a platform without an extendable register, or a TD whose
        kernel offers no way to extend RTMR3, which then stays all zero)."""
        if self.log_register is None:
            return None
        value = registers.get(self.log_register)
        return None if value is not None and not any(value) else self.log_register
