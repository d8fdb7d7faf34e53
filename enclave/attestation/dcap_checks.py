"""Steps 5 and 6 of DCAP quote verification: each collateral piece in turn, then the TCB status.

Used by :func:`enclave.attestation.dcap.verify_quote`, which has checked the
quote's signature chain before. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from enclave.attestation import dcap_tcb
from enclave.attestation.dcap_collateral import (
    Collateral,
    SignedDocument,
    check_crl,
    freshness,
    is_revoked,
    load_crl,
    verify_signed_document,
)
from enclave.attestation.dcap_pck import PckCertificate, common_name, load_certificate_chain_pem
from enclave.attestation.dcap_quote import Quote, TdReport
from enclave.attestation.dcap_tcb import TcbAssessment
from enclave.attestation.dcap_tcb_info import EnclaveIdentity, TcbInfo, parse_enclave_identity, parse_tcb_info
from enclave.errors import EvidenceError


@dataclass
class CollateralCheck:
    """Step 5 and 6 for one quote: each collateral piece in turn, then the TCB status."""

    quote: Quote
    pck: PckCertificate
    root: x509.Certificate
    now: datetime
    accept_expired: bool
    done: list[str]
    warnings: list[str]
    # Collateral older than this TCB evaluation (a manifest's min_tcb_evaluation_data_number)
    # is refused even before it expires: it cannot show a TCB recovery that came after it.
    min_evaluation_number: int | None = None
    signers: list[tuple[str, x509.Certificate]] = field(default_factory=list)

    def run(self, pieces: Collateral) -> TcbAssessment | None:
        if pieces.pck_crl is not None:
            self._pck_crl(pieces.pck_crl, pieces.pck_crl_issuer_chain)
        tcb_info = self._tcb_info(pieces.tcb_info) if pieces.tcb_info is not None else None
        identity = self._qe_identity(pieces.qe_identity) if pieces.qe_identity is not None else None
        if pieces.root_ca_crl is not None:
            self._root_ca_crl(pieces.root_ca_crl)
        if tcb_info is None and identity is None:
            return None
        return self._assess(tcb_info, identity)

    def _fresh(self, what: str, issued: datetime, next_update: datetime) -> None:
        warning = freshness(what, issued, next_update, self.now, accept_expired=self.accept_expired)
        if warning is not None:
            self.warnings.append(warning)

    def _evaluation(self, what: str, number: int) -> None:
        if self.min_evaluation_number is not None and number < self.min_evaluation_number:
            raise EvidenceError(
                f"{what} has TCB evaluation data number {number}; "
                f"the manifest requires at least {self.min_evaluation_number}"
            )

    def _crl(self, der: bytes, issuer: x509.Certificate, what: str) -> x509.CertificateRevocationList:
        crl = load_crl(der, what)
        check_crl(crl, issuer, what)
        assert crl.next_update_utc is not None  # check_crl refuses a CRL without one
        self._fresh(what, crl.last_update_utc, crl.next_update_utc)
        return crl

    def _pck_crl(self, der: bytes, issuer_chain: bytes | None) -> None:
        crl = self._crl(der, self.pck.ca, "pck_crl")
        if issuer_chain is not None:
            issuer = load_certificate_chain_pem(issuer_chain, "pck_crl_issuer_chain")
            if not issuer or issuer[0] != self.pck.ca:
                raise EvidenceError("pck_crl_issuer_chain does not start with the quote's PCK CA certificate")
        if is_revoked(crl, self.pck.leaf):
            raise EvidenceError(f"PCK certificate {self.pck.leaf.serial_number:#x} is revoked by the PCK CRL")
        self.done.append("pck_crl")

    def _root_ca_crl(self, der: bytes) -> None:
        crl = self._crl(der, self.root, "root_ca_crl")
        for what, cert in [("PCK CA", self.pck.ca), *((f"{n} signer", c) for n, c in self.signers)]:
            if is_revoked(crl, cert):
                raise EvidenceError(f"{what} certificate {common_name(cert)!r} is revoked by the Root CA CRL")
        self.done.append("root_ca_crl")

    def _tcb_info(self, doc: SignedDocument) -> TcbInfo:
        body, signer = verify_signed_document(doc, self.root, self.now)
        self.signers.append(("tcb_info", signer))
        info = parse_tcb_info(body)
        self._fresh("tcb_info", info.issue_date, info.next_update)
        self._evaluation("tcb_info", info.tcb_evaluation_data_number)
        wanted = "TDX" if self.quote.is_tdx else "SGX"
        if info.id != wanted:
            raise EvidenceError(f"tcb_info is for {info.id}, the quote is {wanted}")
        if info.fmspc != self.pck.fmspc:
            raise EvidenceError(
                f"tcb_info is for FMSPC {info.fmspc.hex()}, the PCK certificate has {self.pck.fmspc.hex()}"
            )
        if info.pceid != self.pck.pceid:
            raise EvidenceError(
                f"tcb_info is for PCEID {info.pceid.hex()}, the PCK has {self.pck.pceid.hex()}"
            )
        self.done.append("tcb_info")
        return info

    def _qe_identity(self, doc: SignedDocument) -> EnclaveIdentity:
        body, signer = verify_signed_document(doc, self.root, self.now)
        self.signers.append(("qe_identity", signer))
        identity = parse_enclave_identity(body)
        self._fresh("qe_identity", identity.issue_date, identity.next_update)
        self._evaluation("qe_identity", identity.tcb_evaluation_data_number)
        self.done.append("qe_identity")
        return identity

    def _assess(self, tcb_info: TcbInfo | None, identity: EnclaveIdentity | None) -> TcbAssessment:
        td = self.quote.body if isinstance(self.quote.body, TdReport) else None
        platform = module = qe = None
        if tcb_info is not None:
            platform = dcap_tcb.platform_tcb_level(tcb_info, self.pck, td)
            self.done.append("tcb_level")
            if td is not None:
                module = dcap_tcb.tdx_module_level(tcb_info, td)
                self.done.append("tdx_module_identity")
        if identity is not None:
            qe = dcap_tcb.qe_identity_level(identity, self.quote.qe_report, tdx=self.quote.is_tdx)
            self.done.append("qe_identity_level")
        for what, level in (("platform TCB", platform), ("TDX module", module), ("QE", qe)):
            if level is not None and level.status == dcap_tcb.REVOKED:
                raise EvidenceError(f"{what} status is Revoked")
        assessment = dcap_tcb.assess(platform, module, qe)
        if assessment.status == dcap_tcb.REVOKED:
            raise EvidenceError("TCB status is Revoked")
        return assessment
