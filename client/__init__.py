"""End-user side of Custos: verify an enclave against a manifest, then query it.

    from client import connect, read_image

    with connect("enclave.example:8443", "end-user.toml") as enclave:
        result = enclave.infer_image(read_image("digit.png"), top_k=3)
    print(result.top[0].label, result.remaining_quota)

``connect`` raises ``client.errors.VerificationRefusedError`` (and sends
nothing) unless the enclave's evidence meets the manifest; every error is a
``client.errors.ClientError``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.api import Connection, InferResult, Prediction, connect, load_manifest, read_image

__all__ = ["Connection", "InferResult", "Prediction", "connect", "load_manifest", "read_image"]


def __getattr__(name: str) -> Any:
    # Importing the package must not import grpc: the command-line tools set gRPC's log level
    # first (client/_grpc_log.py), and grpc reads it once, when it is first imported.
    if name in __all__:
        return getattr(importlib.import_module("client.api"), name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
