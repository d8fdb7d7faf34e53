"""The ``tdx`` platform: Intel TDX quotes (DCAP v4 and v5) verified against Intel's PKI.

Evidence: ``parts["quote"]`` is the raw TD quote as the guest's quote
generation service returns it (trailing padding is ignored). Collateral: the
names of :mod:`enclave.attestation.dcap_collateral` (``tcb_info``,
``tcb_info_issuer_chain``, ``qe_identity``, ``qe_identity_issuer_chain``,
``root_ca_crl``, ``pck_crl``, ``pck_crl_issuer_chain``, or one
``quote_collateral``); every piece is optional and the claims' details list
the checks that were not done for lack of it.

Registers (raw bytes from the TD report): ``mrtd``, ``rtmr0`` .. ``rtmr3``,
``mrseam``, ``mrsignerseam``, ``mrconfigid``, ``mrowner``, ``mrownerconfig``,
``td_attributes``, ``seam_attributes``, ``xfam``, ``tee_tcb_svn`` and, for a
TDX 1.5 body, ``tee_tcb_svn2`` and ``mrservicetd``. The measurement log is
folded into ``rtmr3`` with SHA-384, the way a TD extends it at run time; where
the guest kernel offers no way to extend RTMR3 it stays all zero, and the log
is then bound through the report data alone.
"""

from __future__ import annotations

from enclave.attestation.dcap import DcapVerifier

PLATFORM = "tdx"


class TdxVerifier(DcapVerifier):
    """Verifies TDX evidence; the defaults pin the Intel SGX Root CA and refuse debug TDs.

    Options (all keyword): ``trust_anchor`` (another root CA, DER or PEM),
    ``accepted_tcb_statuses`` (default: every status but Revoked),
    ``allow_debug`` (default False), ``accept_expired_collateral`` (default False).
    """

    platform = PLATFORM
    log_register = "rtmr3"
    log_hash = "sha384"
