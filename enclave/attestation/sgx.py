"""The ``sgx`` platform: Intel SGX ECDSA quotes (DCAP v3, or v4/v5 with an SGX body).

Evidence: ``parts["quote"]`` is the raw quote. Collateral: as for ``tdx``
(see :mod:`enclave.attestation.dcap_collateral`), with the SGX TCB info and
the ``QE`` identity.

Registers (raw bytes from the enclave report; integers little-endian as in
the report): ``mrenclave``, ``mrsigner``, ``attributes``, ``miscselect``,
``isvprodid``, ``isvsvn``, ``config_id``, ``config_svn``,
``isv_ext_prod_id``, ``isv_family_id``, ``cpusvn``.

SGX has no register that can be extended at run time: ``log_register`` is
None, and the measurement log is bound through the report data alone (the
enclave's MRENCLAVE vouches for the code that wrote it).
"""

from __future__ import annotations

from enclave.attestation.dcap import DcapVerifier

PLATFORM = "sgx"


class SgxVerifier(DcapVerifier):
    """Verifies SGX evidence; the defaults pin the Intel SGX Root CA and refuse debug enclaves.

    Options (all keyword): ``trust_anchor`` (another root CA, DER or PEM),
    ``accepted_tcb_statuses`` (default: every status but Revoked),
    ``allow_debug`` (default False), ``accept_expired_collateral`` (default False).
    """

    platform = PLATFORM
    log_register = None
    log_hash = "sha384"
