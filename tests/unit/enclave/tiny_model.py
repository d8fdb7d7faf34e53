"""A tiny ONNX classifier built in memory for the daemon tests, and its numpy reference.

Flatten -> MatMul -> Add (-> Softmax), weights from a fixed seed, with the
``custos.preprocess`` and ``custos.labels`` metadata the daemon reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class TinyModel:
    data: bytes
    weights: np.ndarray
    bias: np.ndarray
    labels: tuple[str, ...]
    softmax: bool

    def scores(self, tensor: np.ndarray) -> np.ndarray:
        """What the daemon must report for ``tensor``: class probabilities."""
        logits = tensor.reshape(1, -1).astype(np.float64) @ self.weights + self.bias
        shifted = np.exp(logits - logits.max())
        return (shifted / shifted.sum()).reshape(-1)


def tiny_classifier(
    *,
    mode: str = "L",
    size: tuple[int, int] = (4, 4),
    labels: tuple[str, ...] = ("zero", "one", "two"),
    softmax: bool = True,
    preprocess: dict[str, object] | None = None,
    label_metadata: object | None = None,
    scale: float = 1 / 255,
    seed: int = 7,
) -> TinyModel:
    channels = 1 if mode == "L" else 3
    width, height = size
    features = channels * width * height
    classes = len(labels)
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1, size=(features, classes)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=(classes,)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["logits0"]),
        helper.make_node("Add", ["logits0", "B"], ["logits" if softmax else "scores"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["scores"], axis=1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, height, width])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = preprocess if preprocess is not None else {"mode": mode, "size": [width, height], "scale": scale}
    helper.set_model_props(
        model,
        {
            "custos.preprocess": json.dumps(spec),
            "custos.labels": json.dumps(list(labels) if label_metadata is None else label_metadata),
        },
    )
    onnx.checker.check_model(model)
    return TinyModel(
        data=model.SerializeToString(),
        weights=weights.astype(np.float64),
        bias=bias.astype(np.float64),
        labels=labels,
        softmax=softmax,
    )
