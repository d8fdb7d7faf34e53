"""A model served without Custos: onnxruntime plus the same input decoding, nothing else.

Used twice by the inference benchmark: called directly in the benchmark's own
process (the floor), and behind the plain gRPC baseline server. It does the
work the enclave's runtime does for one request, so only the Custos layers
differ: an image is decoded with pillow under the same bounds and shaped by
the model's ``custos.preprocess`` metadata (grayscale or RGB, BOX resize,
``pixel * scale + offset``); a tensor is checked against the input shape and
for non-finite values; the scores are turned into probabilities when they are
not already and the top ``k`` are returned with their labels. The session
options match the enclave daemon's defaults (see ``intra_op_threads``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from PIL import Image

from protos import custos_pb2

FloatArray = npt.NDArray[np.float32]
MAX_IMAGE_BYTES = 8 << 20
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_TENSOR_BYTES = 16 << 20
DEFAULT_TOP_K = 5
_PROBABILITY_TOLERANCE = 1e-3


def intra_op_threads() -> int:
    """The enclave daemon's default (``DaemonConfig.intra_op_threads``): half the cores, 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


# The enclave daemon's default ``DaemonConfig.inference_workers``.
INFERENCE_WORKERS = 2


class PlainInputError(ValueError):
    """The input is not something this model takes."""


@dataclass(frozen=True)
class _ImageSpec:
    mode: str
    width: int
    height: int
    scale: float
    offset: float


class PlainModel:
    def __init__(self, model: bytes, *, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or intra_op_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
        self.sha384 = hashlib.sha384(model).hexdigest()
        (first,) = self._session.get_inputs()
        self._input = first.name
        self._input_shape = tuple(d if isinstance(d, int) and d > 0 else None for d in first.shape)
        self._output = self._session.get_outputs()[0].name
        metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        self._spec: _ImageSpec | None = None
        if "custos.preprocess" in metadata:
            doc = json.loads(metadata["custos.preprocess"])
            width, height = doc["size"]
            self._spec = _ImageSpec(
                doc["mode"], width, height, float(doc["scale"]), float(doc.get("offset", 0.0))
            )
        self._labels: tuple[str, ...] = tuple(json.loads(metadata.get("custos.labels", "[]")))

    # ------------------------------------------------------------- decoding

    def from_image(self, data: bytes) -> FloatArray:
        spec = self._spec
        if spec is None:
            raise PlainInputError("this model takes tensors")
        if len(data) > MAX_IMAGE_BYTES:
            raise PlainInputError("image too large")
        try:
            with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise PlainInputError("image has too many pixels")
                image.load()
                picture = image.convert("RGBA") if image.mode in ("P", "PA") else image
                pixels = picture.convert(spec.mode).resize((spec.width, spec.height), Image.Resampling.BOX)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise PlainInputError(f"not a usable image: {exc}") from None
        array = np.asarray(pixels, dtype=np.float32) * np.float32(spec.scale) + np.float32(spec.offset)
        array = array[np.newaxis, :, :] if spec.mode == "L" else array.transpose(2, 0, 1)
        return np.ascontiguousarray(array[np.newaxis, ...], dtype=np.float32)

    def from_tensor(self, shape: tuple[int, ...], data: bytes) -> FloatArray:
        if len(data) > MAX_TENSOR_BYTES:
            raise PlainInputError("tensor too large")
        expected = tuple(1 if d is None and i == 0 else d for i, d in enumerate(self._input_shape))
        if len(shape) != len(expected) or any(
            e is not None and e != s for s, e in zip(shape, expected, strict=True)
        ):
            raise PlainInputError(f"tensor shape {shape} does not fit {self._input_shape}")
        if len(data) != 4 * math.prod(shape):
            raise PlainInputError("tensor data does not match its shape")
        array = np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
        if not np.isfinite(array).all():
            raise PlainInputError("tensor contains NaN or infinite values")
        return array

    # ------------------------------------------------------------ inference

    def classify(self, tensor: FloatArray, top_k: int) -> list[tuple[int, str, float]]:
        (output,) = self._session.run([self._output], {self._input: tensor})
        scores = np.asarray(output, dtype=np.float64).reshape(-1)
        if (scores < 0).any() or abs(float(scores.sum()) - 1.0) > _PROBABILITY_TOLERANCE:
            shifted = np.exp(scores - scores.max())
            scores = shifted / shifted.sum()
        order = np.argsort(-scores, kind="stable")[: max(1, top_k)]
        return [(int(i), self._label(int(i)), float(scores[i])) for i in order]

    def _label(self, index: int) -> str:
        return self._labels[index] if index < len(self._labels) else ""

    def infer(self, request: custos_pb2.InferRequest) -> custos_pb2.InferResponse:
        """Decode, run and rank one request (blocking: call it from an executor)."""
        kind = request.WhichOneof("input")
        if kind == "image":
            tensor = self.from_image(request.image)
        elif kind == "tensor":
            tensor = self.from_tensor(tuple(request.tensor.shape), request.tensor.float32_data)
        else:
            raise PlainInputError("request carries no input")
        top = self.classify(tensor, request.top_k or DEFAULT_TOP_K)
        return custos_pb2.InferResponse(
            top=[custos_pb2.ClassScore(index=i, label=label, score=s) for i, label, s in top],
            model_sha384=self.sha384,
        )
