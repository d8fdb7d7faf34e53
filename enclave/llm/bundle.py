"""The sealed form of a language model: one byte string holding graph, weights, tokenizer, metadata.

The custodian seals it like any model; the enclave reads it in place (every section is a view into
the one buffer, nothing is copied or written to disk)::

    0   magic "CUSTOSLM", version (u32 LE), 0 (u32), index offset (u64 LE), index length (u64 LE)
    40  zeros up to byte 64
    64  sections, each starting on a 64-byte boundary: "weights" first (the decoder's external
        initializers, so a converter appends them as it goes), then "graph" (ONNX, weights
        external, location ``weights.bin``), "tokenizer" (Hugging Face ``tokenizers`` JSON)
    end the index: JSON {"sections": {name: [offset, length]}, "metadata": {...}}

``is_text_model`` looks only at the magic; ``read_bundle`` checks every offset and length before
anything is parsed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

from enclave.errors import FormatError

MAGIC = b"CUSTOSLM"
VERSION = 1
SECTIONS = ("weights", "graph", "tokenizer")
WEIGHTS_FILE = "weights.bin"  # the external-data location the graph names
_PREAMBLE = struct.Struct("<8sIIQQ")
_START = 64
_ALIGN = 64
MAX_INDEX_BYTES = 1 << 20


@dataclass(frozen=True)
class TextModelInfo:
    """What the enclave needs besides the graph: sizes, special tokens, the chat template."""

    name: str
    architecture: str
    context_length: int
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    add_bos_token: bool
    bos_token: str
    eos_token: str
    chat_template: str | None
    source: str  # "gguf" or "onnxruntime-genai"

    @classmethod
    def from_json(cls, doc: Any) -> TextModelInfo:
        try:
            info = cls(**{**doc, "eos_token_ids": tuple(doc["eos_token_ids"])})
        except (TypeError, KeyError) as exc:
            raise FormatError(f"language-model metadata is malformed: {exc}") from None
        for field in ("context_length", "layers", "kv_heads", "head_dim", "vocab_size"):
            value = getattr(info, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise FormatError(f"language-model metadata {field} is not a positive integer")
        ids = (*info.eos_token_ids, *(() if info.bos_token_id is None else (info.bos_token_id,)))
        if not info.eos_token_ids or not all(isinstance(i, int) and 0 <= i < info.vocab_size for i in ids):
            raise FormatError("language-model metadata has special token ids outside the vocabulary")
        return info


@dataclass(frozen=True)
class TextBundle:
    info: TextModelInfo
    weights: memoryview
    graph: memoryview
    tokenizer: memoryview
    weights_offset: int  # where ``weights`` starts in the payload


def is_text_model(payload: bytes | bytearray | memoryview) -> bool:
    return bytes(payload[: len(MAGIC)]) == MAGIC


class BundleWriter:
    """Builds a bundle in one growing buffer; the weights section is open from the start."""

    def __init__(self) -> None:
        self.data = bytearray(_START)
        self._sections: dict[str, tuple[int, int]] = {}
        self._open: tuple[str, int] | None = ("weights", _START)

    @property
    def weights_start(self) -> int:
        return _START

    def add(self, name: str, content: bytes) -> None:
        self._close()
        self._pad()
        self._sections[name] = (len(self.data), len(content))
        self.data.extend(content)

    def _close(self) -> None:
        if self._open is not None:
            name, start = self._open
            self._sections[name] = (start, len(self.data) - start)
            self._open = None

    def _pad(self) -> None:
        self.data.extend(b"\0" * (-len(self.data) % _ALIGN))

    def finish(self, info: TextModelInfo) -> bytearray:
        self._close()
        missing = set(SECTIONS) - set(self._sections)
        if missing:
            raise ValueError(f"bundle lacks sections {sorted(missing)}")
        index = json.dumps({"sections": self._sections, "metadata": asdict(info)}).encode()
        self._pad()
        offset = len(self.data)
        self.data.extend(index)
        self.data[: _PREAMBLE.size] = _PREAMBLE.pack(MAGIC, VERSION, 0, offset, len(index))
        return self.data


def read_bundle(payload: bytes | bytearray | memoryview) -> TextBundle:
    """The sections as views into ``payload``; ``FormatError`` naming what is wrong."""
    view = memoryview(payload).cast("B")
    if len(view) < _START:
        raise FormatError("language-model bundle is truncated")
    magic, version, _, offset, length = _PREAMBLE.unpack_from(view)
    if magic != MAGIC:
        raise FormatError("not a language-model bundle")
    if version != VERSION:
        raise FormatError(
            f"language-model bundle version {version} is not supported (this enclave reads {VERSION})"
        )
    if length > MAX_INDEX_BYTES or offset < _START or offset + length != len(view):
        raise FormatError("language-model bundle index is out of bounds")
    try:
        index = json.loads(bytes(view[offset:]))
        sections = {name: index["sections"][name] for name in SECTIONS}
        metadata = index["metadata"]
    except (ValueError, KeyError, TypeError):
        raise FormatError("language-model bundle index is malformed") from None
    views: dict[str, memoryview] = {}
    for name, bounds in sections.items():
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int) for b in bounds)):
            raise FormatError(f"language-model bundle section {name} is malformed")
        start, size = bounds
        if start < _START or size < 0 or start + size > offset:
            raise FormatError(f"language-model bundle section {name} is out of bounds")
        views[name] = view[start : start + size]
    return TextBundle(
        TextModelInfo.from_json(metadata),
        views["weights"],
        views["graph"],
        views["tokenizer"],
        weights_offset=sections["weights"][0],
    )
