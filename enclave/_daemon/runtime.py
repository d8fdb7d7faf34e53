"""The model runtime: an onnxruntime session built from model bytes held in memory.

This is the only module that imports onnxruntime. The model never touches the
disk: the session is built from the decrypted bytes directly. onnxruntime
takes only ``bytes``, and keeps a reference to them as long as the session
lives; that one copy is wiped in place as soon as the session is built (the
session holds its own parsed graph), so no plaintext copy outlives the load
in Python memory unwiped.
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from enclave._daemon.errors import InferenceError, ModelRefusedError
from enclave._daemon.preprocess import (
    LABELS_KEY,
    PREPROCESS_KEY,
    Dims,
    FloatArray,
    ImageSpec,
    labels_from_metadata,
)

logger = logging.getLogger(__name__)

# Scores that sum to 1 within this tolerance are taken as probabilities already.
_PROBABILITY_TOLERANCE = 1e-3
# Where a CPython ``bytes`` object's data starts (its fixed header, less the one byte of data it counts).
_BYTES_DATA_OFFSET = bytes.__basicsize__ - 1


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    score: float


class ModelRuntime:
    """One loaded classifier: its input, its metadata, and ``run`` for one input tensor."""

    def __init__(self, model: bytearray, *, sha384: bytes, intra_op_threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        serialized = bytes(model)
        try:
            self._session = ort.InferenceSession(
                serialized, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad model
            raise ModelRefusedError(f"model does not load in onnxruntime: {_first_line(exc)}") from None
        finally:
            wipe_bytes(serialized)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelRefusedError(f"model must have one input and an output, has {len(inputs)} inputs")
        if inputs[0].type != "tensor(float)":
            raise ModelRefusedError(f"model input must be a float tensor, is {inputs[0].type}")
        self.sha384 = sha384
        self.sha384_hex = sha384.hex()  # sent with every answer: computed once
        self.input_name: str = inputs[0].name
        self.input_shape: Dims = tuple(d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape)
        self._output_name: str = outputs[0].name
        metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        self.image_spec = (
            ImageSpec.from_metadata(metadata[PREPROCESS_KEY]) if PREPROCESS_KEY in metadata else None
        )
        if self.image_spec is not None:
            self.image_spec.check_against(self.input_shape)
        self.labels = labels_from_metadata(metadata[LABELS_KEY]) if LABELS_KEY in metadata else ()
        classes = _static_classes(outputs[0].shape)
        if self.labels and classes is not None and classes != len(self.labels):
            raise ModelRefusedError(f"model has {classes} classes but {len(self.labels)} labels")
        logger.info(
            "model loaded: input %s %s, %d labels, %s",
            self.input_name,
            list(self.input_shape),
            len(self.labels),
            "image input" if self.image_spec else "tensor input only",
        )

    def run(self, tensor: FloatArray, top_k: int) -> list[ClassScore]:
        """Classify one input; blocking, so call it from an executor."""
        try:
            (output,) = self._session.run([self._output_name], {self.input_name: tensor})
        except Exception as exc:  # onnxruntime's errors carry no stable type
            logger.warning("inference failed: %s", _first_line(exc))
            raise InferenceError("the model failed on this input") from None
        scores = np.asarray(output, dtype=np.float64).reshape(-1)
        if scores.size == 0 or not np.isfinite(scores).all():
            raise InferenceError("the model produced no usable scores")
        if (scores < 0).any() or abs(float(scores.sum()) - 1.0) > _PROBABILITY_TOLERANCE:
            shifted = np.exp(scores - scores.max())
            scores = shifted / shifted.sum()
        order = np.argsort(-scores, kind="stable")[: max(1, top_k)]
        return [ClassScore(int(i), self._label(int(i)), float(scores[i])) for i in order]

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else ""


def wipe_bytes(data: bytes) -> None:
    """Overwrite an immutable ``bytes`` object with zeros, for the one this module made and owns."""
    if sys.implementation.name != "cpython":
        raise RuntimeError("wiping bytes in place needs CPython's object layout")
    ctypes.memset(id(data) + _BYTES_DATA_OFFSET, 0, len(data))


def _static_classes(shape: list[object]) -> int | None:
    """Classes an output of shape [batch, ...] or [classes] holds, when the shape is static."""
    dims = shape[1:] if len(shape) > 1 else shape
    sizes = [d for d in dims if isinstance(d, int) and d > 0]
    return math.prod(sizes) if sizes and len(sizes) == len(dims) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
