"""End-user side of Custos: verify an enclave against a manifest, then query it.

from client import connect
with connect("host:8443", "end-user.toml") as enclave:
    result = enclave.infer_image(open("digit.png", "rb").read())
"""

from client.api import Connection, InferResult, Prediction, connect

__all__ = ["Connection", "InferResult", "Prediction", "connect"]
