"""``python -m enclave._daemon.model_check``: load a model as the enclave will, and say what it takes.

The custodian runs this in a child process when a model is added (``custodian
model add``): the model's plaintext arrives on stdin, is loaded by the same
``ModelRuntime`` the enclave serves it with, and the answer is one JSON object
on stdout, ``{"inputs": [{"name", "type", "shape"}]}`` (exit 0) or
``{"refused": REASON}`` (exit 1). A child process keeps onnxruntime out of the
custodian, and a model that crashes or exhausts the loader takes down only
the check.
"""

from __future__ import annotations

import hashlib
import json
import sys

from enclave._daemon.errors import ModelRefusedError
from enclave._daemon.runtime import ModelRuntime


def main() -> int:
    model = bytearray(sys.stdin.buffer.read())
    try:
        runtime = ModelRuntime(model, sha384=hashlib.sha384(model).digest(), intra_op_threads=1)
    except ModelRefusedError as exc:
        print(json.dumps({"refused": str(exc)}))
        return 1
    shape = ["?" if d is None else str(d) for d in runtime.input_shape]
    kind = "image" if runtime.image_spec is not None else "tensor"
    doc = {"inputs": [{"name": runtime.input_name, "type": "float", "shape": shape, "kind": kind}]}
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
