"""The model runtime on a tiny ONNX classifier built in the test."""

from __future__ import annotations

import numpy as np
import pytest

from enclave._daemon.errors import InferenceError, ModelRefusedError
from enclave._daemon.preprocess import ImageSpec
from enclave._daemon.runtime import ModelRuntime
from tests.unit.enclave.tiny_model import tiny_classifier

SHA = bytes(range(48))


def load(data: bytes) -> ModelRuntime:
    return ModelRuntime(bytearray(data), sha384=SHA, intra_op_threads=1)


def sample(seed: int, shape: tuple[int, ...] = (1, 1, 4, 4)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_reads_input_and_metadata() -> None:
    runtime = load(tiny_classifier(labels=("a", "b", "c", "d")).data)
    assert runtime.input_name == "image"
    assert runtime.input_shape == (None, 1, 4, 4)
    assert runtime.labels == ("a", "b", "c", "d")
    assert runtime.image_spec == ImageSpec(mode="L", width=4, height=4, scale=1 / 255)
    assert runtime.sha384 == SHA


@pytest.mark.parametrize("softmax", [True, False], ids=["probabilities", "logits"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_top_k_matches_the_numpy_reference(softmax: bool, seed: int) -> None:
    model = tiny_classifier(labels=("a", "b", "c", "d", "e"), softmax=softmax)
    runtime = load(model.data)
    tensor = sample(seed)
    expected = model.scores(tensor)
    top = runtime.run(tensor, 3)
    order = list(np.argsort(-expected)[:3])
    assert [s.index for s in top] == order
    assert [s.label for s in top] == [model.labels[i] for i in order]
    assert [s.score for s in top] == pytest.approx([expected[i] for i in order], rel=1e-5)


def test_top_k_is_clamped_to_the_classes() -> None:
    top = load(tiny_classifier().data).run(sample(4), 50)
    assert sorted(s.index for s in top) == [0, 1, 2]
    assert sum(s.score for s in top) == pytest.approx(1.0, rel=1e-5)


def test_rgb_model() -> None:
    model = tiny_classifier(mode="RGB", size=(3, 2))
    runtime = load(model.data)
    assert runtime.input_shape == (None, 3, 2, 3)
    tensor = sample(5, (1, 3, 2, 3))
    assert runtime.run(tensor, 1)[0].index == int(np.argmax(model.scores(tensor)))


def test_model_without_labels_reports_empty_labels() -> None:
    runtime = load(tiny_classifier(label_metadata=[]).data)
    assert {s.label for s in runtime.run(sample(6), 3)} == {""}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "does not load in onnxruntime", id="empty"),
        pytest.param(b"\x08\x07 not a model", "does not load in onnxruntime", id="garbage"),
        pytest.param(tiny_classifier(label_metadata=["a", "b"]).data, "3 classes but 2 labels", id="labels"),
        pytest.param(tiny_classifier(label_metadata={"a": 1}).data, "custos.labels", id="labels-type"),
        pytest.param(
            tiny_classifier(preprocess={"mode": "L", "size": [5, 4], "scale": 1}).data,
            "model input is",
            id="size-mismatch",
        ),
        pytest.param(
            tiny_classifier(preprocess={"mode": "RGB", "size": [4, 4], "scale": 1}).data,
            "model input is",
            id="channel-mismatch",
        ),
    ],
)
def test_unusable_models_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ModelRefusedError, match=reason):
        load(data)


def test_runtime_failure_is_an_inference_error() -> None:
    runtime = load(tiny_classifier().data)
    with pytest.raises(InferenceError):
        runtime.run(sample(7, (1, 1, 4, 5)), 1)
