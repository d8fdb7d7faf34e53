"""Weights quantised in blocks along each row, as onnxruntime's ``MatMulNBits`` takes them.

GGUF's Q4_0, Q4_1 and Q8_0 blocks (32 weights, one float16 scale, Q4_1 also a float16 minimum)
map onto ``MatMulNBits`` exactly: value = (q - zero_point) * scale, with a float zero point for
4 bits (Q4_1's minimum is -zero_point * scale) and 128 for 8 bits (Q8_0's signed bytes, shifted).
So the converted model computes with the very weights of the GGUF file, at about its size, and
nothing is requantised. The layouts differ: GGML keeps element j of a 4-bit block in the low
nibble of byte j and element j + 16 in its high nibble; ``MatMulNBits`` keeps consecutive pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
# GGUF type name to (bytes per block, bits in ONNX); the types that map exactly.
GGML_BLOCKS = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8)}


@dataclass(frozen=True)
class BlockQuantized:
    """A weight [rows = out features, cols = in features] in ``MatMulNBits`` form."""

    rows: int
    cols: int
    bits: int
    packed: np.ndarray  # uint8 [rows, cols / 32, 32 * bits / 8]
    scales: np.ndarray  # float32 [rows * cols / 32]
    zero_points: np.ndarray  # float32 (4 bits) or uint8 (8 bits), [rows * cols / 32]

    def take_rows(self, order: np.ndarray) -> BlockQuantized:
        blocks = self.cols // BLOCK
        per_block = np.asarray(order)[:, None] * blocks + np.arange(blocks)[None, :]
        return BlockQuantized(
            self.rows,
            self.cols,
            self.bits,
            self.packed[order],
            self.scales[per_block.reshape(-1)],
            self.zero_points[per_block.reshape(-1)],
        )

    def dequantize(self) -> np.ndarray:
        if self.bits == 8:
            q = self.packed.astype(np.float32)
        else:
            q = np.stack([self.packed & 0x0F, self.packed >> 4], axis=-1).reshape(
                (*self.packed.shape[:2], BLOCK)
            )
            q = q.astype(np.float32)
        blocks = (*self.packed.shape[:2], 1)
        zero = self.zero_points.astype(np.float32).reshape(blocks)
        values: np.ndarray = ((q - zero) * self.scales.reshape(blocks)).reshape(self.rows, self.cols)
        return values


def from_ggml(kind: str, raw: np.ndarray, rows: int, cols: int) -> BlockQuantized:
    """``raw``: the tensor's bytes as GGUF stores them, uint8 [rows, bytes per row]."""
    size, bits = GGML_BLOCKS[kind]
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // BLOCK, size)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        signed = blocks[..., 2:].copy().view(np.int8)
        packed = (signed.astype(np.int16) + 128).astype(np.uint8)
        zero_points = np.full(scale.size, 128, dtype=np.uint8)
        return BlockQuantized(rows, cols, bits, packed, scale.reshape(-1), zero_points)
    nibbles = blocks[..., 2:] if kind == "Q4_0" else blocks[..., 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # element order restored: j, then j + 16
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    if kind == "Q4_0":
        zero = np.full(scale.shape, 8.0, dtype=np.float32)
    else:
        minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        # A block whose scale is 0 holds its minimum everywhere: q = 0, zero point -1, scale = minimum.
        flat = scale == 0
        packed[flat] = 0
        zero = np.where(flat, -1.0, -minimum / np.where(flat, 1.0, scale)).astype(np.float32)
        scale = np.where(flat, minimum, scale).astype(np.float32)
    return BlockQuantized(rows, cols, bits, packed, scale.reshape(-1), zero.reshape(-1))
