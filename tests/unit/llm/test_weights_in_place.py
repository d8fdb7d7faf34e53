"""The loaded model reads its weights in the decrypted bundle, owns it, and zeroes it when closed."""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from enclave._daemon.errors import ModelRefusedError
from enclave.envelope import zeroize
from enclave.llm.bundle import WEIGHTS_FILE, read_bundle
from enclave.llm.interface import SamplingParams
from enclave.llm.loader import load_text_model
from enclave.llm.weights import weights_in_place
from tests.unit.llm.tiny_llama import reference
from tests.unit.llm.tiny_llama.weights import SHAPE, tiny_weights

GREEDY = SamplingParams(max_tokens=32, temperature=0.0)


def test_the_model_keeps_only_the_weights_and_zeroes_them_when_closed(tiny_bundle: bytes) -> None:
    payload = bytearray(tiny_bundle)
    parts = read_bundle(tiny_bundle)
    start, end = parts.weights_offset, parts.weights_offset + len(parts.weights)
    model = load_text_model(payload, intra_op_threads=1)
    # The graph, the tokenizer and the index are gone; the weights are where the session reads them.
    assert not any(payload[:start])
    assert not any(payload[end:])
    assert payload[start:end] == tiny_bundle[start:end]
    prompt = model.encode_prompt("The enclave")
    assert list(model.generate(prompt, GREEDY)) == reference.greedy(tiny_weights(), SHAPE, prompt, 32, {0, 2})
    model.close()
    assert not any(payload)
    with pytest.raises(RuntimeError, match="unloaded"):
        list(model.generate(prompt, GREEDY))
    model.close()  # twice is harmless


def test_the_session_reads_the_weights_where_they_lie_not_a_copy_of_them(tiny_bundle: bytes) -> None:
    """Those it reads as they are: the matrices it packs for its kernels it copied while loading."""
    payload = bytearray(tiny_bundle)
    model = load_text_model(payload, intra_op_threads=1)
    prompt = model.encode_prompt("The enclave")
    before = list(model.generate(prompt, GREEDY))
    zeroize(payload)  # behind the model's back: it now computes with zero weights
    assert list(model.generate(prompt, GREEDY)) != before


def test_a_model_dropped_without_closing_zeroes_its_weights_when_collected(tiny_bundle: bytes) -> None:
    payload = bytearray(tiny_bundle)
    model = load_text_model(payload, intra_op_threads=1)
    assert any(payload)
    del model
    gc.collect()
    assert not any(payload)


def _graph(*tensors: TensorProto) -> onnx.ModelProto:
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("Identity", [tensors[0].name], ["y"])
    return helper.make_model(helper.make_graph([node], "g", [], [out], initializer=list(tensors)))


def _external(name: str, data_type: int, dims: list[int], **entries: object) -> TensorProto:
    tensor = TensorProto(name=name, data_type=data_type, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": WEIGHTS_FILE, **entries}.items():
        tensor.external_data.add(key=key, value=str(value))
    return tensor


def test_each_external_weight_becomes_a_view_and_an_unaligned_one_a_copy() -> None:
    weights = bytearray(64)
    weights[8:16] = np.array([1.5, -2.0], dtype=np.float32).tobytes()
    weights[33:41] = np.array([3.0, 4.0], dtype=np.float32).tobytes()  # float32 at an odd offset
    graph = _graph(
        _external("aligned", TensorProto.FLOAT, [2], offset=8, length=8),
        _external("odd", TensorProto.FLOAT, [2], offset=33, length=8),
        helper.make_tensor("inline", TensorProto.FLOAT, [1], [0.5]),  # in the graph: not ours to give
    )
    found = weights_in_place(graph, memoryview(weights))
    assert found.names == ["aligned", "odd"]
    assert found.copied == 8
    assert [v.numpy().tolist() for v in found.values] == [[1.5, -2.0], [3.0, 4.0]]
    weights[8:12] = np.array([7.0], dtype=np.float32).tobytes()
    weights[33:37] = np.array([7.0], dtype=np.float32).tobytes()
    assert [v.numpy().tolist() for v in found.values] == [[7.0, -2.0], [3.0, 4.0]]  # view, copy
    found.wipe_copies()
    assert found.values[1].numpy().tolist() == [0.0, 0.0]


def _constant(tensor: TensorProto) -> onnx.NodeProto:
    return helper.make_node("Constant", [], ["c"], value=tensor)


def _branch(tensor: TensorProto) -> onnx.NodeProto:
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    body = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])], "b", [], [out], initializer=[tensor]
    )
    return helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)


@pytest.mark.parametrize("node", [_constant, _branch], ids=["constant-attribute", "subgraph-initializer"])
def test_external_data_outside_the_top_graphs_initializers_is_refused(node: Any) -> None:
    """onnxruntime would read such a tensor from ``weights.bin`` in the working directory."""
    graph = _graph(_external("w0", TensorProto.FLOAT, [2], offset=0, length=8))
    graph.graph.node.append(node(_external("hidden", TensorProto.FLOAT, [2], offset=8, length=8)))
    with pytest.raises(ModelRefusedError, match="'hidden' keeps its data outside the graph"):
        weights_in_place(graph, memoryview(bytearray(64)))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        pytest.param(
            _external("w", TensorProto.FLOAT, [2], offset=60, length=8), "outside", id="past-the-end"
        ),
        pytest.param(
            _external("w", TensorProto.FLOAT, [2], offset=-8, length=8), "outside", id="negative-offset"
        ),
        pytest.param(_external("w", TensorProto.FLOAT, [3], offset=0, length=8), "do not match", id="length"),
        pytest.param(
            _external("w", TensorProto.STRING, [1], offset=0, length=8), "do not match", id="string"
        ),
        pytest.param(_external("w", TensorProto.FLOAT, [2], offset="x", length=8), "malformed", id="offset"),
        pytest.param(_external("w", TensorProto.FLOAT, [2], offset=0), "malformed", id="no-length"),
    ],
)
def test_a_weight_that_does_not_fit_the_section_is_refused_naming_it(
    tensor: TensorProto, message: str
) -> None:
    with pytest.raises(ModelRefusedError, match=f"weight 'w'.*{message}"):
        weights_in_place(_graph(tensor), memoryview(bytearray(64)))


def test_a_weight_in_another_file_is_refused() -> None:
    tensor = _external("w", TensorProto.FLOAT, [2], offset=0, length=8)
    tensor.external_data[0].value = "/etc/passwd"
    with pytest.raises(ModelRefusedError, match="not in the bundle's weights section"):
        weights_in_place(_graph(tensor), memoryview(bytearray(64)))
