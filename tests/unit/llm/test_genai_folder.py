"""`model add DIR`: an onnxruntime-genai model folder becomes a bundle the enclave loads from memory.

The folder here is written from the tiny Llama in the builder's layout (genai_config.json,
model.onnx + model.onnx.data, tokenizer.json, tokenizer_config.json); its graph is Custos's own
decoder, so these tests hold the packaging and the loader, not onnxruntime-genai's operators.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from custodian.errors import ModelFormatError
from custodian.llm.decoder_graph import ExternalWeights, build_decoder
from custodian.llm.genai_folder import bundle_genai_folder
from custodian.llm.gguf_model import GgufModel
from custodian.llm.gguf_tokenizer import tokenizer_of
from enclave.llm.bundle import read_bundle
from enclave.llm.interface import ChatMessage, SamplingParams
from enclave.llm.loader import load_text_model
from tests.unit.llm.tiny_llama import reference
from tests.unit.llm.tiny_llama.make import GGUF_PATH
from tests.unit.llm.tiny_llama.tokenizer import CHAT_TEMPLATE
from tests.unit.llm.tiny_llama.weights import SHAPE, tiny_weights


def write_folder(directory: Path) -> Path:
    gguf = GgufModel(GGUF_PATH)
    weights = ExternalWeights()
    graph = build_decoder(gguf.text.shape, gguf.weight, weights)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "model.onnx.data"
    directory.mkdir()
    (directory / "model.onnx").write_bytes(graph.SerializeToString())
    (directory / "model.onnx.data").write_bytes(weights.view())
    (directory / "tokenizer.json").write_text(tokenizer_of(gguf).json)
    config = {
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
        "bos_token": {"content": "<|im_start|>"},
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    genai = {
        "model": {
            "type": "llama",
            "context_length": SHAPE.context,
            "vocab_size": SHAPE.vocab,
            "eos_token_id": [0, 2],
            "bos_token_id": 1,
            "decoder": {
                "filename": "model.onnx",
                "num_hidden_layers": SHAPE.layers,
                "num_key_value_heads": SHAPE.kv_heads,
                "head_size": SHAPE.head_dim,
                "inputs": {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key"},
            },
        }
    }
    (directory / "genai_config.json").write_text(json.dumps(genai))
    return directory


def test_a_genai_folder_loads_and_decodes_greedily_as_the_reference(tmp_path: Path) -> None:
    bundle = bundle_genai_folder(write_folder(tmp_path / "tiny-genai"))
    info = read_bundle(bundle).info
    assert (info.source, info.name, info.eos_token_ids, info.bos_token) == (
        "onnxruntime-genai",
        "tiny-genai",
        (0, 2),
        "<|im_start|>",
    )
    model = load_text_model(bundle, intra_op_threads=1)
    prompt = model.encode_chat([ChatMessage("user", "The enclave proves")])
    expected = reference.greedy(tiny_weights(), SHAPE, prompt, 24, {0, 2})
    assert list(model.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0))) == expected


def _edit_json(name: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        doc = json.loads((directory / name).read_text())
        change(doc)
        (directory / name).write_text(json.dumps(doc))

    return edit


def _relocate(location: str) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        import onnx

        graph = onnx.load_model(directory / "model.onnx", load_external_data=False)
        graph.graph.initializer[-1].external_data[0].value = location
        (directory / "model.onnx").write_bytes(graph.SerializeToString())

    return edit


@pytest.mark.parametrize(
    ("breaks", "message"),
    [
        pytest.param(
            lambda d: (d / "genai_config.json").unlink(),
            "not an onnxruntime-genai model folder",
            id="no-config",
        ),
        pytest.param(
            _edit_json("genai_config.json", lambda c: c["model"].pop("vocab_size")),
            "lacks the model's sizes",
            id="sizes",
        ),
        pytest.param(
            _edit_json(
                "genai_config.json", lambda c: c["model"]["decoder"]["inputs"].update(input_ids="ids")
            ),
            "decoder name input_ids is 'ids'",
            id="input-name",
        ),
        pytest.param(
            _edit_json("tokenizer.json", lambda t: t.update(decoder={"type": "Metaspace"})),
            "decodes with 'Metaspace'; only byte-level BPE",
            id="sentencepiece",
        ),
        pytest.param(
            lambda d: (d / "tokenizer.json").unlink(), "cannot read .*tokenizer.json", id="no-tokenizer"
        ),
        pytest.param(_relocate("../secrets.bin"), "outside its folder", id="data-outside"),
        pytest.param(_relocate("other.data"), "in 2 files; one is supported", id="two-data-files"),
    ],
)
def test_a_folder_custos_cannot_use_is_refused_naming_why(
    tmp_path: Path, breaks: Callable[[Path], None], message: str
) -> None:
    directory = write_folder(tmp_path / "model")
    breaks(directory)
    with pytest.raises(ModelFormatError, match=message):
        bundle_genai_folder(directory)
