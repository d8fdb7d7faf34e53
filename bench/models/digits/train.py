"""Train the Custos demo model: a small MLP on scikit-learn's bundled 8x8 digits.

Run ``python bench/models/digits/train.py``: it trains with a fixed seed, prints
the held-out accuracy, exports the network as ONNX built node by node with
``onnx.helper`` from the learned weights, checks with onnxruntime that the
exported graph predicts exactly what scikit-learn predicts on the test split,
and writes, next to itself:

- ``digits.onnx``: input ``image`` float32 [N, 1, 8, 8] (pixel values 0..16,
  as in the data set), output ``probabilities`` float32 [N, 10];
- ``samples/``: held-out digits as 64x64 PNG (``digit-<label>.png``), one JPEG
  and a file that is not an image, for trying the client.

Running it twice gives byte-identical files on the same machine.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

HERE = Path(__file__).resolve().parent
MODEL_PATH = HERE / "digits.onnx"
SAMPLES = HERE / "samples"

SEED = 0
TEST_FRACTION = 0.25
HIDDEN = 64
MAX_PIXEL = 16.0  # load_digits pixel values are integers 0..16
SIDE = 8
SAMPLE_SIDE = 64  # samples are upscaled 8x with NEAREST
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# How the enclave turns an encoded image into the model's input: grayscale,
# resized to 8x8, value * scale + offset. 16/255 maps 0..255 back to 0..16.
SCALE = MAX_PIXEL / 255.0
PREPROCESS = {"mode": "L", "size": [SIDE, SIDE], "scale": SCALE, "offset": 0.0}
OPSET = 17
IR_VERSION = 8  # readable by onnxruntime >= 1.14
JPEG_LABEL = 7
# Gray levels are whole numbers, so v * 255/16 is rounded: a PNG sample decodes
# back to its digit within half a gray level (plus float32 noise).
ROUNDING_ERROR = 0.5 * MAX_PIXEL / 255.0 + 1e-5

Floats = NDArray[np.float32]


def train() -> tuple[MLPClassifier, NDArray[np.float64], NDArray[np.int64], float]:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=TEST_FRACTION, random_state=SEED, stratify=digits.target
    )
    classifier = MLPClassifier(
        hidden_layer_sizes=(HIDDEN,), solver="adam", alpha=1e-3, max_iter=1000, random_state=SEED
    )
    classifier.fit(x_train / MAX_PIXEL, y_train)
    accuracy = float(classifier.score(x_test / MAX_PIXEL, y_test))
    return classifier, x_test, y_test, accuracy


def export(classifier: MLPClassifier, accuracy: float, test_size: int) -> onnx.ModelProto:
    """image [N,1,8,8] -> Flatten -> x/16 -> (Gemm -> Relu)* -> Gemm -> Softmax."""
    initializers = [numpy_helper.from_array(np.array([1.0 / MAX_PIXEL], dtype=np.float32), "inv_max_pixel")]
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("Mul", ["flat", "inv_max_pixel"], ["x0"]),
    ]
    current = "x0"
    layers = list(zip(classifier.coefs_, classifier.intercepts_, strict=True))
    for i, (weights, bias) in enumerate(layers):
        w_name, b_name, out = f"dense{i}.weight", f"dense{i}.bias", f"dense{i}"
        initializers += [
            numpy_helper.from_array(np.asarray(weights, dtype=np.float32), w_name),
            numpy_helper.from_array(np.asarray(bias, dtype=np.float32), b_name),
        ]
        nodes.append(helper.make_node("Gemm", [current, w_name, b_name], [out]))
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"]))
            current = f"relu{i}"
        else:
            nodes.append(helper.make_node("Softmax", [out], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIDE, SIDE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(LABELS)])],
        initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="custos bench/models/digits/train.py",
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=(
            f"Handwritten digit classifier (MLP 64-{HIDDEN}-10) trained on scikit-learn's load_digits "
            f"(UCI optical recognition of handwritten digits, 8x8, values 0..16); held-out accuracy "
            f"{accuracy:.4f} on {test_size} test images (seed {SEED}). "
            "Input: image float32 [N,1,8,8] in 0..16; output: probabilities float32 [N,10]."
        ),
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {"custos.preprocess": json.dumps(PREPROCESS), "custos.labels": json.dumps(LABELS)},
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_probabilities(model_bytes: bytes, images: Floats) -> Floats:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (output,) = session.run(["probabilities"], {"image": images})
    return np.asarray(output, dtype=np.float32)


def as_images(rows: NDArray[np.float64]) -> Floats:
    return rows.astype(np.float32).reshape(-1, 1, SIDE, SIDE)


def verify_export(
    model_bytes: bytes, classifier: MLPClassifier, x_test: NDArray[np.float64], y_test: NDArray[np.int64]
) -> float:
    """The exported graph must predict what scikit-learn predicts, image for image."""
    probabilities = onnx_probabilities(model_bytes, as_images(x_test))
    expected = classifier.predict_proba(x_test / MAX_PIXEL)
    mismatched = int(np.sum(probabilities.argmax(axis=1) != classifier.predict(x_test / MAX_PIXEL)))
    if mismatched:
        raise SystemExit(f"exported graph disagrees with scikit-learn on {mismatched} test images")
    if not np.allclose(probabilities, expected, atol=1e-5):
        raise SystemExit("exported graph's probabilities differ from scikit-learn's by more than 1e-5")
    return float(np.mean(probabilities.argmax(axis=1) == y_test))


def to_picture(row: NDArray[np.float64]) -> Image.Image:
    """8x8 values 0..16 -> 64x64 grayscale, gray = round(v * 255 / 16), NEAREST upscaling."""
    gray = np.rint(row.reshape(SIDE, SIDE) * (255.0 / MAX_PIXEL)).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((SAMPLE_SIDE, SAMPLE_SIDE), Image.Resampling.NEAREST)


def decode_like_enclave(data: bytes) -> Floats:
    """The preprocessing the model's metadata asks for, with a BOX downscale."""
    with Image.open(io.BytesIO(data)) as picture:
        small = picture.convert("L").resize((SIDE, SIDE), Image.Resampling.BOX)
    values: Floats = np.asarray(small, dtype=np.float32) * np.float32(SCALE)
    return values.reshape(1, 1, SIDE, SIDE)


def encode(picture: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "PNG":
        picture.save(buffer, format="PNG", optimize=False, compress_level=9)
    else:
        picture.save(buffer, format="JPEG", quality=95, subsampling=0, optimize=False)
    return buffer.getvalue()


def write_samples(model_bytes: bytes, x_test: NDArray[np.float64], y_test: NDArray[np.int64]) -> list[str]:
    """The first correctly classified test image of each class, checked through the decode path."""
    SAMPLES.mkdir(exist_ok=True)
    predicted = onnx_probabilities(model_bytes, as_images(x_test)).argmax(axis=1)
    written: list[str] = []
    for label in range(len(LABELS)):
        index = next(i for i in range(len(y_test)) if y_test[i] == label and predicted[i] == label)
        picture = to_picture(x_test[index])
        files = [(f"digit-{label}.png", encode(picture, "PNG"))]
        if label == JPEG_LABEL:
            files.append((f"digit-{label}.jpg", encode(picture, "JPEG")))
        for name, data in files:
            decoded = decode_like_enclave(data)
            error = float(np.max(np.abs(decoded.ravel() - x_test[index])))
            if name.endswith(".png") and error > ROUNDING_ERROR:
                raise SystemExit(f"{name} decodes {error:.4f} away from its digit, over {ROUNDING_ERROR:.4f}")
            if int(onnx_probabilities(model_bytes, decoded).argmax()) != label:
                raise SystemExit(f"{name} is not classified as {label} after decoding")
            (SAMPLES / name).write_bytes(data)
            written.append(name)
    (SAMPLES / "not-an-image.txt").write_text("Plain text, not an image: the enclave must refuse it.\n")
    written.append("not-an-image.txt")
    return written


def main() -> None:
    classifier, x_test, y_test, accuracy = train()
    print(f"scikit-learn MLP held-out accuracy: {accuracy:.4f} ({len(y_test)} test images)")
    model_bytes = export(classifier, accuracy, len(y_test)).SerializeToString(deterministic=True)
    onnx_accuracy = verify_export(model_bytes, classifier, x_test, y_test)
    print(f"onnxruntime held-out accuracy:      {onnx_accuracy:.4f} (predictions identical)")
    MODEL_PATH.write_bytes(model_bytes)
    print(f"wrote {MODEL_PATH.relative_to(HERE.parents[2])} ({len(model_bytes)} bytes)")
    samples = write_samples(model_bytes, x_test, y_test)
    print(f"wrote {len(samples)} samples to {SAMPLES.relative_to(HERE.parents[2])}/: {', '.join(samples)}")


if __name__ == "__main__":
    main()
