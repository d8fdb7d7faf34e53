"""Language models at ``model add``: GGUF files read and converted to an ONNX decoder plus tokenizer.

The modules here import ``gguf`` and ``onnx`` (slow to import); the console imports them only when a
language model is added. This file stays light: the console's help names what is supported.
"""

from __future__ import annotations

# GGUF architecture name to the models that ship under it (what `model add` names in its refusal).
ARCHITECTURES = {
    "llama": "Llama 2/3.x, SmolLM2, Mistral 7B",
    "qwen2": "Qwen 2 / 2.5",
}


def supported_architectures() -> str:
    return ", ".join(f"{arch} ({models})" for arch, models in ARCHITECTURES.items())
