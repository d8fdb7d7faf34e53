"""``python -m enclave._daemon.model_check``: load a model as the enclave will, and say what it takes.

The custodian runs this in a child process when a model is added (``custodian
model add``): the model's plaintext arrives on stdin, is loaded by the same
code the enclave serves it with, and the answer is one JSON object on stdout,
``{"inputs": [{"name", "type", "shape", "kind"}]}`` (exit 0) or
``{"refused": REASON}`` (exit 1). A classifier loads in ``ModelRuntime``; a
language model (``enclave.llm.bundle``) loads through ``load_text_model`` and
must also generate a few tokens, greedily, from a short prompt; its one
"input" is the token sequence up to its context length, of kind ``language``.
A child process keeps onnxruntime out of the custodian, and a model that
crashes or exhausts the loader takes down only the check.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from enclave._daemon.errors import ModelRefusedError
from enclave._daemon.runtime import ModelRuntime
from enclave.llm.interface import SamplingParams
from enclave.llm.loader import is_text_model, load_text_model

_CHECK_PROMPT = "Hello"
_CHECK_TOKENS = 4


def main() -> int:
    model = bytearray(sys.stdin.buffer.read())
    try:
        doc = _check_text_model(model) if is_text_model(model) else _check_classifier(model)
    except ModelRefusedError as exc:
        print(json.dumps({"refused": str(exc)}))
        return 1
    print(json.dumps(doc))
    return 0


def _check_classifier(model: bytearray) -> dict[str, Any]:
    runtime = ModelRuntime(model, sha384=hashlib.sha384(model).digest(), intra_op_threads=1)
    shape = ["?" if d is None else str(d) for d in runtime.input_shape]
    kind = "image" if runtime.image_spec is not None else "tensor"
    return {"inputs": [{"name": runtime.input_name, "type": "float", "shape": shape, "kind": kind}]}


def _check_text_model(model: bytearray) -> dict[str, Any]:
    text_model = load_text_model(model, intra_op_threads=1)
    prompt = text_model.encode_prompt(_CHECK_PROMPT)
    try:
        produced = list(
            text_model.generate(prompt, SamplingParams(max_tokens=_CHECK_TOKENS, temperature=0.0))
        )
    except Exception as exc:  # onnxruntime's errors carry no stable type
        raise ModelRefusedError(f"language model loads but does not generate: {exc}") from None
    shape = [str(text_model.context_length)]
    return {
        "inputs": [{"name": "tokens", "type": "int64", "shape": shape, "kind": "language"}],
        "generated": len(produced),
    }


if __name__ == "__main__":
    sys.exit(main())
