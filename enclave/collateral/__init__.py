"""Fetching vendor-signed collateral (Intel PCS / PCCS, AMD KDS) for the verifiers.

The verifiers in :mod:`enclave.attestation` do no I/O; the modules here do the
fetching, with explicit byte limits, and hand back the bytes as the service sent
them. Nothing here is trusted: every document is checked by the verifier
against the vendor root pinned in code.
"""
