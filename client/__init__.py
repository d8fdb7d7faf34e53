"""End-user side of Custos: verify an enclave against a manifest, then query it.

    from client import connect, read_image

    with connect("enclave.example:8443", "end-user.toml") as enclave:
        result = enclave.infer_image(read_image("digit.png"), top_k=3)
    print(result.top[0].label, result.remaining_quota)

``connect`` raises ``client.errors.VerificationRefusedError`` (and sends
nothing) unless the enclave's evidence meets the manifest; every error is a
``client.errors.ClientError``.
"""

from client.api import Connection, InferResult, Prediction, connect, load_manifest, read_image

__all__ = ["Connection", "InferResult", "Prediction", "connect", "load_manifest", "read_image"]
