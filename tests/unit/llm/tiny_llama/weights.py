"""The tiny Llama's shape and weights, drawn from a fixed seed, in Hugging Face's layout.

Every weight is exactly representable in the GGUF type it is stored as (see ``STORAGE``), so the
GGUF file holds these very numbers and a correct dequantiser gives them back bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEED = 20261205
Q_BLOCK = 32  # Q8_0 and Q4_1 quantise blocks of 32 weights along a row


@dataclass(frozen=True)
class TinyShape:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    vocab: int = 320
    context: int = 128
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPE = TinyShape()

# GGUF tensor type per weight: every type the converter dequantises for SmolLM2, plus F16 and BF16.
STORAGE = {
    "token_embd": "Q8_0",
    "output": "F16",
    "output_norm": "F32",
    "blk.0.attn_q": "Q4_1",
    "blk.0.attn_k": "Q4_1",
    "blk.0.attn_v": "Q4_1",
    "blk.0.attn_output": "Q4_1",
    "blk.0.ffn_gate": "F16",
    "blk.0.ffn_up": "F16",
    "blk.0.ffn_down": "F16",
    "blk.1.attn_q": "Q8_0",
    "blk.1.attn_k": "Q8_0",
    "blk.1.attn_v": "Q8_0",
    "blk.1.attn_output": "Q8_0",
    "blk.1.ffn_gate": "BF16",
    "blk.1.ffn_up": "Q4_1",
    "blk.1.ffn_down": "Q4_1",
}


def tiny_weights(shape: TinyShape = SHAPE, *, qkv_bias: bool = False) -> dict[str, np.ndarray]:
    """GGUF tensor names (without ``.weight``) to float32 arrays, [out, in] like ``nn.Linear``."""
    return {name: values for name, (values, _) in tiny_tensors(shape, qkv_bias=qkv_bias).items()}


def tiny_tensors(
    shape: TinyShape = SHAPE, *, qkv_bias: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each weight as float32 values and as its stored form: raw GGUF blocks ([rows, bytes]) or floats.

    ``qkv_bias`` adds Qwen 2's query, key and value biases (``blk.N.attn_q.bias``...), drawn last so
    that every other weight stays the same."""
    rng = np.random.default_rng(SEED)
    h, d = shape.hidden, shape.head_dim
    shapes = {"token_embd": (shape.vocab, h), "output": (shape.vocab, h)}
    for i in range(shape.layers):
        shapes |= {
            f"blk.{i}.attn_q": (shape.heads * d, h),
            f"blk.{i}.attn_k": (shape.kv_heads * d, h),
            f"blk.{i}.attn_v": (shape.kv_heads * d, h),
            f"blk.{i}.attn_output": (h, shape.heads * d),
            f"blk.{i}.ffn_gate": (shape.ffn, h),
            f"blk.{i}.ffn_up": (shape.ffn, h),
            f"blk.{i}.ffn_down": (h, shape.ffn),
        }
    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, dims in shapes.items():
        scale = (3.0 if name == "output" else 1.0) / np.sqrt(dims[1])
        tensors[name] = _draw(rng, dims, STORAGE[name], float(scale))
    for i in range(shape.layers):
        for norm in (f"blk.{i}.attn_norm", f"blk.{i}.ffn_norm"):
            values = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
            tensors[norm] = (values, values)
    values = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    tensors["output_norm"] = (values, values)
    for i in range(shape.layers) if qkv_bias else ():
        for name, size in (
            ("attn_q", shape.heads * d),
            ("attn_k", shape.kv_heads * d),
            ("attn_v", shape.kv_heads * d),
        ):
            values = (0.1 * rng.standard_normal(size)).astype(np.float32)
            tensors[f"blk.{i}.{name}.bias"] = (values, values)
    return tensors


def _draw(
    rng: np.random.Generator, dims: tuple[int, int], kind: str, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = dims
    blocks = (rows, cols // Q_BLOCK, 1)
    if kind == "Q8_0":
        d = (rng.uniform(0.5, 1.0, blocks) * scale / 64).astype(np.float16)
        q = rng.integers(-127, 128, (rows, cols // Q_BLOCK, Q_BLOCK)).astype(np.int8)
        values = d.astype(np.float32) * q.astype(np.float32)
        raw = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=-1)
        return values.reshape(rows, cols), raw.reshape(rows, -1)
    if kind == "Q4_1":
        d = (rng.uniform(0.5, 1.0, blocks) * scale / 4).astype(np.float16)
        m = (-7.5 * d.astype(np.float32) + rng.uniform(-0.1, 0.1, blocks) * scale).astype(np.float16)
        q = rng.integers(0, 16, (rows, cols // Q_BLOCK, Q_BLOCK)).astype(np.uint8)
        q[..., 0], q[..., 1] = 0, 15  # each block spans its whole range, as a quantiser would make it
        values = d.astype(np.float32) * q.astype(np.float32) + m.astype(np.float32)
        half = Q_BLOCK // 2
        nibbles = q[..., :half] | (q[..., half:] << 4)  # element j low, element j + 16 high
        raw = np.concatenate([d.view(np.uint8), m.view(np.uint8), nibbles], axis=-1)
        return values.reshape(rows, cols), raw.reshape(rows, -1)
    values = (rng.standard_normal(dims) * scale).astype(np.float32)
    if kind == "F16":
        stored = values.astype(np.float16)
        return stored.astype(np.float32), stored
    if kind == "BF16":
        top = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exact by construction
        return (top.astype(np.uint32) << 16).view(np.float32), top
    return values, values
