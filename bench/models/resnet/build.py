"""Build a ResNet-18-sized ONNX classifier with random, seeded weights (for speed, not accuracy).

Run ``python bench/models/resnet/build.py [--out PATH]`` (default
``bench/out/models/resnet18.onnx``; the benchmark calls ``build`` itself). The
graph is ResNet-18 (He et al. 2015, the torchvision layout) with batch
normalisation folded into the convolutions, as an exporter would for
inference:

    input float32 [1, 3, 224, 224]
    conv 7x7/2 64 -> relu -> maxpool 3x3/2
    4 stages of 2 basic blocks (64, 128, 256, 512 channels; stride 2 and a
    1x1 projection at the start of stages 2-4)
    global average pool -> flatten -> dense 1000 -> logits float32 [1, 1000]

11.7 million parameters (about 45 MiB). The weights are drawn from a fixed seed
with He scaling, and the second convolution of each block is damped so the
residual stream stays finite, so the same file comes out on every run and the
enclave accepts its scores. It takes tensors only (no ``custos.preprocess``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_OUT = ROOT / "bench" / "out" / "models" / "resnet18.onnx"
INPUT_SHAPE = (1, 3, 224, 224)
CLASSES = 1000
STAGES = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2
SEED = 18
OPSET = 17
IR_VERSION = 8
# Scale of each block's second convolution: keeps the sum over eight residual blocks finite.
RESIDUAL_DAMPING = 0.2


class _Graph:
    """Accumulates nodes and initializers; every weight comes from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.parameters = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        tensor = np.ascontiguousarray(array, dtype=np.float32)
        self.initializers.append(numpy_helper.from_array(tensor, name))
        self.parameters += tensor.size
        return name

    def conv(
        self, name: str, x: str, cin: int, cout: int, kernel: int, stride: int, *, damping: float = 1.0
    ) -> str:
        fan_in = cin * kernel * kernel
        w = self.rng.standard_normal((cout, cin, kernel, kernel), dtype=np.float32)
        w *= np.float32(damping * np.sqrt(2.0 / fan_in))
        b = self.rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01)
        pad = kernel // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.weight(f"{name}.weight", w), self.weight(f"{name}.bias", b)],
                [name],
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )
        )
        return name

    def op(self, kind: str, inputs: list[str], output: str, **attributes: Any) -> str:
        self.nodes.append(helper.make_node(kind, inputs, [output], **attributes))
        return output

    def basic_block(self, name: str, x: str, cin: int, cout: int, stride: int) -> str:
        y = self.op("Relu", [self.conv(f"{name}.conv1", x, cin, cout, 3, stride)], f"{name}.relu1")
        y = self.conv(f"{name}.conv2", y, cout, cout, 3, 1, damping=RESIDUAL_DAMPING)
        shortcut = x
        if stride != 1 or cin != cout:
            shortcut = self.conv(f"{name}.downsample", x, cin, cout, 1, stride)
        return self.op("Relu", [self.op("Add", [y, shortcut], f"{name}.add")], f"{name}.out")


def resnet18(seed: int = SEED) -> onnx.ModelProto:
    g = _Graph(seed)
    x = g.op("Relu", [g.conv("stem.conv", "input", 3, STAGES[0], 7, 2)], "stem.relu")
    x = g.op("MaxPool", [x], "stem.pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = STAGES[0]
    for stage, cout in enumerate(STAGES, start=1):
        for block in range(BLOCKS_PER_STAGE):
            stride = 2 if stage > 1 and block == 0 else 1
            x = g.basic_block(f"layer{stage}.{block}", x, cin, cout, stride)
            cin = cout
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x], "pool")], "flat", axis=1)
    fc_w = g.rng.standard_normal((CLASSES, cin), dtype=np.float32) * np.float32(0.01)
    fc_b = np.zeros(CLASSES, dtype=np.float32)
    g.op("Gemm", [x, g.weight("fc.weight", fc_w), g.weight("fc.bias", fc_b)], "logits", transB=1)
    graph = helper.make_graph(
        g.nodes,
        "resnet18_sized",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(INPUT_SHAPE))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
        g.initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="custos bench/models/resnet/build.py",
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=f"ResNet-18-sized network, random weights (seed {seed}), {g.parameters} parameters; "
        "for inference benchmarks only.",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def build(out: Path = DEFAULT_OUT) -> Path:
    """Write the model to ``out`` unless a file from the same seed is already there."""
    marker = out.with_suffix(".seed")
    if out.exists() and marker.exists() and marker.read_text() == str(SEED):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    data = resnet18().SerializeToString(deterministic=True)
    partial = out.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(out)
    marker.write_text(str(SEED))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the model")
    args = parser.parse_args()
    path = build(args.out)
    model = onnx.load(str(path))
    print(f"wrote {path} ({path.stat().st_size} bytes, {parameter_count(model)} parameters)")


if __name__ == "__main__":
    main()
