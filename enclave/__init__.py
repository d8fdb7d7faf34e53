"""Custos enclave side.

Public, pure modules (no I/O, no runtime dependencies) that the custodian and the
client import as well: ``enclave.attestation`` (evidence, verification, policy,
manifest), ``enclave.envelope`` (model and key encryption), ``enclave.identity``
(attested TLS certificates), ``enclave.receipts`` (signed usage receipts) and
``enclave.errors``.

The daemon itself (onnxruntime, gRPC servers, platform access) lives in the
private ``enclave._daemon`` package, which nothing outside imports.
"""
