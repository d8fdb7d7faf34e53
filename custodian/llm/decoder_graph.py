"""A Llama-family decoder as an ONNX graph with a key/value cache, built with ``onnx`` alone (no torch).

Inputs: ``input_ids`` and ``position_ids`` [batch, seq] int64, ``attention_mask`` [batch, past + seq]
int64 (1 for a real token), and ``past_key_values.N.key`` / ``.value`` [batch, kv_heads, past,
head_dim] float for each layer N. Outputs: ``logits`` [batch, vocab] for the last position only (a
prefill never needs the others, and the vocabulary projection is the largest matrix product), and
``present.N.key`` / ``.value`` [batch, kv_heads, past + seq, head_dim].

Attention is written with standard operators: grouped query heads attend to their shared key/value
head through a broadcast matrix product ([batch, kv_heads, group, seq, head_dim]), so the cache is
never repeated per query head. Rotary embeddings use the half-split layout (Hugging Face's); the GGUF
reader undoes llama.cpp's interleaving before the weights get here.

Weights are external initializers, appended to ``ExternalWeights`` in the order the graph asks for
them, so a converter can dequantise one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from custodian.llm.block_quant import BLOCK, BlockQuantized
from enclave.llm.bundle import WEIGHTS_FILE

OPSET = 17
_ALIGN = 64
# Added to the scores of masked positions: far below any real score, far from float32's overflow.
_MASKED = -1e30


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float
    rms_eps: float
    qkv_bias: bool = False  # Qwen 2 has biases on the query, key and value projections
    tied_embeddings: bool = False  # no output matrix: the token embedding projects to the vocabulary
    rope_factors: bool = False  # Llama 3.1+: per-frequency divisors in ``rope_freqs``

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads or self.head_dim % 2:
            raise ValueError(f"{self.heads} query heads cannot share {self.kv_heads} key/value heads")


# Weight name (GGUF's, without ``.weight``) to its values, [out, in] as ``nn.Linear`` keeps them;
# a matrix may come block-quantised (it then runs as ``MatMulNBits``), any other weight as floats.
WeightSource = Callable[[str], "np.ndarray | BlockQuantized"]
_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.uint8): TensorProto.UINT8}


class ExternalWeights:
    """The weights file the graph's external initializers point into, appended to ``data`` in memory.

    Offsets count from where ``data`` ended when this was made (a bundle's weights section).
    """

    def __init__(self, data: bytearray | None = None) -> None:
        self.data = bytearray() if data is None else data
        self.start = len(self.data)

    def view(self) -> memoryview:
        return memoryview(self.data)[self.start :]

    def add(self, name: str, values: np.ndarray) -> TensorProto:
        values = np.ascontiguousarray(values if values.dtype == np.uint8 else values.astype(np.float32))
        self.data.extend(b"\0" * (-(len(self.data) - self.start) % _ALIGN))
        offset = len(self.data) - self.start
        self.data.extend(values.tobytes())
        tensor = TensorProto(name=name, data_type=_TYPES[values.dtype], dims=values.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", values.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        return tensor


def build_decoder(
    shape: DecoderShape,
    source: WeightSource,
    weights: ExternalWeights,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> onnx.ModelProto:
    """The decoder graph; reports ``progress(layers done, layers)`` as it takes each layer's weights."""
    g = _Graph(weights)
    batch_seq = ["batch", "seq"]
    g.input("input_ids", TensorProto.INT64, batch_seq)
    g.input("position_ids", TensorProto.INT64, batch_seq)
    g.input("attention_mask", TensorProto.INT64, ["batch", "total"])
    embedding = g.weight("token_embd", _floats(source("token_embd")))
    x = g.op("Gather", embedding, "input_ids")
    cos, sin = _rotary(g, shape, source)
    bias = _attention_bias(g)
    for layer in range(shape.layers):
        x = _layer(g, shape, source, layer, x, cos, sin, bias)
        if progress is not None:
            progress(layer + 1, shape.layers)
    last = g.op("Gather", x, g.const(np.array(-1, dtype=np.int64)), axis=1)
    last = _rms_norm(g, last, g.weight("output_norm", _floats(source("output_norm"))), shape.rms_eps)
    output = None if shape.tied_embeddings else source("output")
    if isinstance(output, BlockQuantized):
        logits = _block_matmul(g, last, "output", output, name_out="logits")
    else:
        projection = embedding if output is None else g.weight("output", output)
        logits = g.op("Gemm", last, projection, transB=1, name_out="logits")
    g.output(logits, ["batch", shape.vocab])
    g.outputs.insert(0, g.outputs.pop())  # logits first, then present.N.key/value in layer order
    graph = helper.make_graph(g.nodes, "custos-decoder", g.inputs, g.outputs, g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="custos")
    model.ir_version = 8
    return model


def _layer(
    g: _Graph, s: DecoderShape, source: WeightSource, i: int, x: str, cos: str, sin: str, bias: str
) -> str:
    def linear(value: str, name: str) -> str:
        weight = source(f"blk.{i}.{name}")
        if isinstance(weight, BlockQuantized):
            out = _block_matmul(g, value, f"blk.{i}.{name}", weight)
        else:
            out = g.op("MatMul", value, g.weight(f"blk.{i}.{name}", weight.T))
        if s.qkv_bias and name in ("attn_q", "attn_k", "attn_v"):
            return g.op("Add", out, g.weight(f"blk.{i}.{name}.bias", _floats(source(f"blk.{i}.{name}.bias"))))
        return out

    def norm(value: str, name: str) -> str:
        return _rms_norm(g, value, g.weight(f"blk.{i}.{name}", _floats(source(f"blk.{i}.{name}"))), s.rms_eps)

    group = s.heads // s.kv_heads
    h = norm(x, "attn_norm")
    q = g.op("Reshape", linear(h, "attn_q"), g.ints(0, 0, s.kv_heads, group, s.head_dim))
    q = g.op("Transpose", q, perm=[0, 2, 3, 1, 4])  # [batch, kv_heads, group, seq, head_dim]
    q = _rotate(g, q, g.op("Unsqueeze", cos, g.ints(1)), g.op("Unsqueeze", sin, g.ints(1)))
    q = g.op("Mul", q, g.const(np.array(1.0 / np.sqrt(s.head_dim), dtype=np.float32)))
    k = g.op("Reshape", linear(h, "attn_k"), g.ints(0, 0, s.kv_heads, s.head_dim))
    k = _rotate(g, g.op("Transpose", k, perm=[0, 2, 1, 3]), cos, sin)  # [batch, kv_heads, seq, head_dim]
    v = g.op("Reshape", linear(h, "attn_v"), g.ints(0, 0, s.kv_heads, s.head_dim))
    v = g.op("Transpose", v, perm=[0, 2, 1, 3])
    cache: list[str | int] = ["batch", s.kv_heads, "past", s.head_dim]
    g.input(f"past_key_values.{i}.key", TensorProto.FLOAT, cache)
    g.input(f"past_key_values.{i}.value", TensorProto.FLOAT, cache)
    present: list[str | int] = ["batch", s.kv_heads, "total", s.head_dim]
    keys = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, name_out=f"present.{i}.key")
    values = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, name_out=f"present.{i}.value")
    g.output(keys, present)
    g.output(values, present)
    keys_t = g.op("Unsqueeze", g.op("Transpose", keys, perm=[0, 1, 3, 2]), g.ints(2))
    scores = g.op("Add", g.op("MatMul", q, keys_t), bias)
    probs = g.op("Softmax", scores, axis=-1)
    attended = g.op("MatMul", probs, g.op("Unsqueeze", values, g.ints(2)))
    attended = g.op("Transpose", attended, perm=[0, 3, 1, 2, 4])  # [batch, seq, kv_heads, group, head_dim]
    attended = g.op("Reshape", attended, g.ints(0, 0, s.heads * s.head_dim))
    x = g.op("Add", x, linear(attended, "attn_output"))
    h = norm(x, "ffn_norm")
    gate = linear(h, "ffn_gate")
    swiglu = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), linear(h, "ffn_up"))
    return g.op("Add", x, linear(swiglu, "ffn_down"))


def _rotary(g: _Graph, s: DecoderShape, source: WeightSource) -> tuple[str, str]:
    """cos and sin [batch, 1, seq, head_dim] for the positions in ``position_ids``."""
    inv_freq = 1.0 / s.rope_theta ** (np.arange(0, s.head_dim, 2, dtype=np.float64) / s.head_dim)
    if s.rope_factors:
        inv_freq = inv_freq / _floats(source("rope_freqs")).astype(np.float64)
    positions = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.ints(-1))
    angles = g.op("Mul", positions, g.const(inv_freq.astype(np.float32)))
    angles = g.op("Unsqueeze", g.op("Concat", angles, angles, axis=-1), g.ints(1))
    return g.op("Cos", angles), g.op("Sin", angles)


def _rotate(g: _Graph, x: str, cos: str, sin: str) -> str:
    first, second = g.ops("Split", x, axis=-1, num_outputs=2)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def _attention_bias(g: _Graph) -> str:
    """[batch, 1, 1, seq, total]: 0 where a query may attend (causal, not padding), else very negative."""
    total = g.op("Gather", g.op("Shape", "attention_mask"), g.const(np.array(1, dtype=np.int64)))
    seq = g.op("Gather", g.op("Shape", "input_ids"), g.const(np.array(1, dtype=np.int64)))
    one = g.const(np.array(1, dtype=np.int64))
    keys = g.op("Range", g.const(np.array(0, dtype=np.int64)), total, one)
    queries = g.op("Range", g.op("Sub", total, seq), total, one)
    causal = g.op("LessOrEqual", g.op("Unsqueeze", keys, g.ints(0)), g.op("Unsqueeze", queries, g.ints(1)))
    real = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.ints(1, 2, 3))
    allowed = g.op("And", causal, real)
    zero, masked = g.const(np.array(0.0, dtype=np.float32)), g.const(np.array(_MASKED, dtype=np.float32))
    return g.op("Where", allowed, zero, masked)


def _block_matmul(
    g: _Graph, value: str, name: str, weight: BlockQuantized, name_out: str | None = None
) -> str:
    """``value @ weight.T`` with the weight kept in its blocks (onnxruntime's contrib ``MatMulNBits``)."""
    inputs = (
        g.weight(f"{name}.q{weight.bits}", weight.packed),
        g.weight(f"{name}.scales", weight.scales),
        g.weight(f"{name}.zero_points", weight.zero_points),
    )
    attrs = {"K": weight.cols, "N": weight.rows, "bits": weight.bits, "block_size": BLOCK}
    return g.op("MatMulNBits", value, *inputs, name_out=name_out, domain="com.microsoft", **attrs)


def _floats(values: np.ndarray | BlockQuantized) -> np.ndarray:
    return values.dequantize() if isinstance(values, BlockQuantized) else values


def _rms_norm(g: _Graph, x: str, weight: str, eps: float) -> str:
    mean_square = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
    root = g.op("Sqrt", g.op("Add", mean_square, g.const(np.array(eps, dtype=np.float32))))
    return g.op("Mul", g.op("Div", x, root), weight)


class _Graph:
    def __init__(self, weights: ExternalWeights) -> None:
        self._weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{kind}_{self._count}"

    def op(
        self, op_type: str, *inputs: str, name_out: str | None = None, domain: str | None = None, **attrs: Any
    ) -> str:
        out = name_out or self._name(op_type)
        node = helper.make_node(op_type, list(inputs), [out], name=self._name("n"), domain=domain, **attrs)
        self.nodes.append(node)
        return out

    def ops(self, op_type: str, *inputs: str, num_outputs: int, **attrs: Any) -> list[str]:
        outs = [self._name(op_type) for _ in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._name("n"), **attrs))
        return outs

    def const(self, values: np.ndarray) -> str:
        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def weight(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(self._weights.add(name, values))
        return name

    def input(self, name: str, dtype: int, dims: Sequence[str | int]) -> None:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, dims))

    def output(self, name: str, dims: Sequence[str | int]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
