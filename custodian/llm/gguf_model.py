"""A Llama-family GGUF file as the decoder builder wants it: its shape, and weights one at a time.

The ``gguf`` package maps the file and parses tensors and metadata; each weight is dequantised to
float32 only when the builder asks for it, so converting never holds more than the output and one
tensor. llama.cpp's converter stores the query and key rows of a ``llama`` model interleaved for
its rotary kernel; they are put back into the half-split order the ONNX graph uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from custodian.errors import ModelFormatError
from custodian.llm import ARCHITECTURES, supported_architectures
from custodian.llm.block_quant import GGML_BLOCKS, BlockQuantized, from_ggml
from custodian.llm.decoder_graph import DecoderShape

# The tensor types those models' GGUF files use; ``gguf`` dequantises each of them in numpy.
TENSOR_TYPES = frozenset(
    gguf.GGMLQuantizationType[name]
    for name in (
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    )
)  # fmt: skip


@dataclass(frozen=True)
class GgufText:
    """The file's metadata that the bundle and the tokenizer need."""

    architecture: str
    name: str
    context_length: int
    shape: DecoderShape


class GgufModel:
    def __init__(self, path: Path) -> None:
        # The gguf package is a third-party parser of bytes we did not write: whatever it raises on a
        # malformed file (IndexError, UnicodeDecodeError, ...) is the file's fault, said as such.
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as exc:
            raise ModelFormatError(f"{path} is not a readable GGUF file: {_reason(exc)}") from None
        self.path = path
        architecture = self.string("general.architecture")
        if architecture not in ARCHITECTURES:
            raise ModelFormatError(
                f"GGUF architecture {architecture!r} is not supported; supported: {supported_architectures()}"
            )
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.text = GgufText(
            architecture=architecture,
            name=self.string("general.name", default=path.stem),
            context_length=self._int("context_length"),
            shape=self._shape(architecture),
        )
        for tensor in self._tensors.values():
            if tensor.tensor_type not in TENSOR_TYPES:
                raise ModelFormatError(
                    f"tensor {tensor.name} is of type {tensor.tensor_type.name}, which Custos does not"
                    f" convert; supported: {', '.join(sorted(t.name for t in TENSOR_TYPES))}"
                )

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def field(self, key: str) -> object:
        try:
            field = self._reader.get_field(key)
            return None if field is None else field.contents()
        except Exception as exc:
            raise ModelFormatError(f"GGUF metadata {key} is malformed: {_reason(exc)}") from None

    def string(self, key: str, *, default: str | None = None) -> str:
        value = self.field(key)
        if value is None and default is not None:
            return default
        if not isinstance(value, str):
            raise ModelFormatError(f"GGUF metadata {key} is missing or not a string")
        return value

    def _int(self, key: str, *, default: int | None = None) -> int:
        value = self.field(f"{self._arch}.{key}")
        if value is None and default is not None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelFormatError(f"GGUF metadata {self._arch}.{key} is missing or not a positive integer")
        return value

    def _float(self, key: str, default: float) -> float:
        value = self.field(f"{self._arch}.{key}")
        if value is None:
            return default
        if not isinstance(value, float | int) or value <= 0:
            raise ModelFormatError(f"GGUF metadata {self._arch}.{key} is not a positive number")
        return float(value)

    @property
    def _arch(self) -> str:
        return str(self.field("general.architecture"))

    def _shape(self, architecture: str) -> DecoderShape:
        hidden, heads = self._int("embedding_length"), self._int("attention.head_count")
        head_dim = self._int("attention.key_length", default=hidden // heads)
        if self._int("rope.dimension_count", default=head_dim) != head_dim:
            raise ModelFormatError(
                "partial rotary embeddings (rope.dimension_count < head size) are not supported"
            )
        scaling = self.field(f"{architecture}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise ModelFormatError(f"rotary scaling {scaling!r} is not supported")
        vocab = self._tensor("token_embd.weight").shape[1]
        try:
            return DecoderShape(
                layers=self._int("block_count"),
                hidden=hidden,
                heads=heads,
                kv_heads=self._int("attention.head_count_kv", default=heads),
                head_dim=head_dim,
                ffn=self._int("feed_forward_length"),
                vocab=int(vocab),
                rope_theta=self._float("rope.freq_base", 10000.0),
                rms_eps=self._float("attention.layer_norm_rms_epsilon", 1e-5),
                qkv_bias="blk.0.attn_q.bias" in self._tensors,
                tied_embeddings="output.weight" not in self._tensors,
                rope_factors="rope_freqs.weight" in self._tensors,
            )
        except ValueError as exc:
            raise ModelFormatError(f"GGUF model shape is inconsistent: {exc}") from None

    def _tensor(self, name: str) -> gguf.ReaderTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelFormatError(f"GGUF file has no tensor {name}") from None

    def weight(self, name: str, *, keep_blocks: bool = False) -> np.ndarray | BlockQuantized:
        """``name`` (GGUF's name less ``.weight``), [out, in] for a matrix, dequantised to float32;
        with ``keep_blocks`` a matrix multiplied in Q4_0, Q4_1 or Q8_0 stays in its blocks."""
        full = name if name.endswith(".bias") else f"{name}.weight"
        tensor = self._tensor(full)
        dims = tuple(int(d) for d in reversed(tensor.shape))
        kind = tensor.tensor_type.name
        values: np.ndarray | BlockQuantized
        try:
            if keep_blocks and kind in GGML_BLOCKS and name.endswith(_MATRICES) and len(dims) == 2:
                values = from_ggml(kind, tensor.data, dims[0], dims[1])
            else:
                raw = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                values = raw.astype(np.float32).reshape(dims)
        except ModelFormatError:
            raise
        except Exception as exc:
            raise ModelFormatError(f"GGUF tensor {full} is malformed: {_reason(exc)}") from None
        if self.text.architecture == "llama" and name.endswith(_ROTARY):
            heads = self.text.shape.heads if "attn_q" in name else self.text.shape.kv_heads
            order = _half_split_rotary(np.arange(dims[0]), heads)
            values = values.take_rows(order) if isinstance(values, BlockQuantized) else values[order]
        return values


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# The weights the decoder multiplies by (the others are gathered from or scale elementwise).
_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output")
_ROTARY = ("attn_q", "attn_k", "attn_q.bias", "attn_k.bias")


def _half_split_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary pairs (rows 2i, 2i+1 back to i, i + d/2)."""
    tail = rows.shape[1:]
    per_head = rows.shape[0] // heads
    return rows.reshape(heads, per_head // 2, 2, *tail).swapaxes(1, 2).reshape(rows.shape)
