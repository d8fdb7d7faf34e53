"""The enclave daemon: attester, key holder, model runtime, quota lease, usage reporter.

Private: nothing outside ``enclave._daemon`` imports it. The console script
``enclave`` (``enclave._daemon.cli:main``) is its entry point, and
``python -m enclave._daemon.model_check``, which the custodian runs in a child
process to check at ``model add`` that the runtime loads a model.

Shape, from the bottom up: ``config`` (one frozen dataclass of bounds),
``errors``; the hardware attesters ``tpm_device`` (its TPM reached through
``tpm_connection``) and ``tsm`` (TDX, SEV-SNP, SGX), and ``measured`` (identity
key, attester, measurement log) above them; ``preprocess``
(image and tensor input), ``runtime`` (onnxruntime, the only importer),
``lease`` (local quota); ``enrolment`` (TLS enrolment, client certificate),
``model_push`` (model stream opened in memory) and ``link`` (the mutual-TLS
session: lease, usage reports signed as receipts, control stream);
``inference`` (the gRPC servicer) with ``status`` (errors to gRPC codes, in one
place) and ``metrics``; ``daemon`` ties them together (and zeroizes and enrols
again when the lease cannot be renewed) and ``cli`` parses flags, with the
platform flags in ``tpm_flags`` and ``tee_flags`` and the ``ENCLAVE_*``
defaults in ``env_flags``.
"""
