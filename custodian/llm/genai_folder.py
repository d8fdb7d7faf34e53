"""``model add DIR``: an onnxruntime-genai model folder, as its model builder writes it, to a bundle.

The folder holds ``genai_config.json``, the decoder graph (``model.onnx``), its external weights
(``model.onnx.data``), ``tokenizer.json`` and ``tokenizer_config.json``. The graph's external-data
entries are pointed at the bundle's weights section (offsets unchanged: the section is the data file
as it is); the sizes, special tokens and context length come from ``genai_config.json``, the chat
template from ``tokenizer_config.json``. The enclave runs it with plain onnxruntime, like a converted
GGUF, so it must follow the same cache naming (``past_key_values.N.key``, ``present.N.key``) and
use a byte-level BPE tokenizer; anything else is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from custodian.errors import ModelFormatError
from enclave.llm.bundle import WEIGHTS_FILE, BundleWriter, TextModelInfo

_CONFIG = "genai_config.json"
# genai_config.json's decoder input/output names that the enclave's loader feeds and reads.
_NAMES = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "past_key_names": "past_key_values.%d.key",
    "past_value_names": "past_key_values.%d.value",
    "logits": "logits",
    "present_key_names": "present.%d.key",
    "present_value_names": "present.%d.value",
}


def is_genai_folder(path: Path) -> bool:
    return path.is_dir() and (path / _CONFIG).is_file()


def bundle_genai_folder(directory: Path) -> bytearray:
    """The bundle's bytes; ``ModelFormatError`` naming the file or key that is missing or unusable."""
    if not is_genai_folder(directory):
        raise ModelFormatError(f"{directory} is not an onnxruntime-genai model folder (no {_CONFIG})")
    config = _json(directory, _CONFIG)
    try:
        model, decoder = config["model"], config["model"]["decoder"]
        names = {**decoder.get("inputs", {}), **decoder.get("outputs", {})}
        for key, expected in _NAMES.items():
            if names.get(key, expected) != expected:
                raise ModelFormatError(f"{_CONFIG}: decoder name {key} is {names[key]!r}, not {expected!r}")
        eos = model["eos_token_id"]
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        shape = {
            "context_length": model["context_length"],
            "layers": decoder["num_hidden_layers"],
            "kv_heads": decoder["num_key_value_heads"],
            "head_dim": decoder["head_size"],
            "vocab_size": model["vocab_size"],
        }
        graph_file = decoder.get("filename", "model.onnx")
        bos = model.get("bos_token_id")
    except (KeyError, TypeError):
        raise ModelFormatError(f"{directory / _CONFIG} lacks the model's sizes or special tokens") from None
    graph = onnx.ModelProto()
    try:
        graph.ParseFromString(_read(directory, graph_file))
    except DecodeError:
        raise ModelFormatError(f"{directory / graph_file} is not an ONNX model") from None
    data_file = _point_external_data_at_bundle(graph, directory / graph_file)
    tokenizer = _read(directory, "tokenizer.json")
    _check_byte_level(tokenizer, directory)
    tokenizer_config = (
        _json(directory, "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
    )
    template = tokenizer_config.get("chat_template")
    writer = BundleWriter()
    if data_file is not None:
        _append_file(writer.data, directory / data_file)
    writer.add("graph", graph.SerializeToString())
    writer.add("tokenizer", tokenizer)
    info = TextModelInfo(
        name=directory.name,
        architecture=str(model.get("type", "unknown")),
        **shape,
        eos_token_ids=eos_ids,
        bos_token_id=bos if isinstance(bos, int) else None,
        add_bos_token=bool(tokenizer_config.get("add_bos_token", False)) and isinstance(bos, int),
        bos_token=_token_text(tokenizer_config.get("bos_token")),
        eos_token=_token_text(tokenizer_config.get("eos_token")),
        chat_template=template if isinstance(template, str) else None,
        source="onnxruntime-genai",
    )
    return writer.finish(info)


def _point_external_data_at_bundle(graph: onnx.ModelProto, where: Path) -> str | None:
    """The one external data file the graph names, its entries renamed to the bundle's weights section."""
    files: set[str] = set()
    for tensor in graph.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    if Path(entry.value).name != entry.value or entry.value in ("", ".", ".."):
                        raise ModelFormatError(
                            f"{where} names external data {entry.value!r} outside its folder"
                        )
                    files.add(entry.value)
                    entry.value = WEIGHTS_FILE
    if len(files) > 1:
        raise ModelFormatError(f"{where} keeps its weights in {len(files)} files; one is supported")
    return next(iter(files), None)


def _check_byte_level(tokenizer: bytes, directory: Path) -> None:
    try:
        decoder = json.loads(tokenizer).get("decoder") or {}
    except (ValueError, AttributeError):
        raise ModelFormatError(f"{directory / 'tokenizer.json'} is not a tokenizers JSON document") from None
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    if "ByteLevel" not in kinds:
        raise ModelFormatError(
            f"{directory / 'tokenizer.json'} decodes with {decoder.get('type')!r}; only byte-level BPE"
            " tokenizers (GPT-2 style: Llama 3, Qwen, SmolLM2) are supported"
        )


def _append_file(buffer: bytearray, path: Path) -> None:
    """The file's bytes at the end of ``buffer``, in parts (no second whole copy in memory)."""
    try:
        with path.open("rb") as handle:
            while part := handle.read(16 << 20):
                buffer.extend(part)
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc.strerror}") from None


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _read(directory: Path, name: str) -> bytes:
    try:
        return (directory / name).read_bytes()
    except OSError as exc:
        raise ModelFormatError(f"cannot read {directory / name}: {exc.strerror}") from None


def _json(directory: Path, name: str) -> dict[str, Any]:
    try:
        doc = json.loads(_read(directory, name))
    except ValueError:
        raise ModelFormatError(f"{directory / name} is not JSON") from None
    if not isinstance(doc, dict):
        raise ModelFormatError(f"{directory / name} is not a JSON object")
    return doc
