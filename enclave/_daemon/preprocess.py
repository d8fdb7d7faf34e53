"""Turn an inference input into the model's input tensor, refusing anything odd.

Two kinds of input: an encoded image (PNG or JPEG), decoded with pillow under
byte and pixel bounds and shaped by the model's ``custos.preprocess`` metadata;
or a raw float32 tensor checked against the model's input shape. Every
rejection is ``InvalidInputError`` with the reason, and happens before any quota is
used.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from enclave._daemon.errors import InvalidInputError, ModelRefusedError

PREPROCESS_KEY = "custos.preprocess"
LABELS_KEY = "custos.labels"
_CHANNELS = {"L": 1, "RGB": 3}
_FORMATS = ("PNG", "JPEG")
_MAX_SIDE = 1 << 14
_MAX_LABELS = 1 << 20
# An image may have at most this many times the pixels of the model's input (8x each side)...
MAX_IMAGE_AREA_RATIO = 64
# ...or this many, if more: a small model still takes an ordinary photo's thumbnail.
MIN_IMAGE_PIXEL_ALLOWANCE = 1024 * 1024

Dims = tuple[int | None, ...]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class InputLimits:
    max_image_bytes: int
    max_image_pixels: int
    max_tensor_bytes: int


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes the model's input: ``pixel * scale + offset`` as [1, C, H, W]."""

    mode: str
    width: int
    height: int
    scale: float
    offset: float = 0.0

    @property
    def channels(self) -> int:
        return _CHANNELS[self.mode]

    def pixel_limit(self, limits: InputLimits) -> int:
        """The most pixels an image for this model may declare: decoding more only burns CPU."""
        allowance = max(self.width * self.height * MAX_IMAGE_AREA_RATIO, MIN_IMAGE_PIXEL_ALLOWANCE)
        return min(limits.max_image_pixels, allowance)

    @classmethod
    def from_metadata(cls, text: str) -> ImageSpec:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ModelRefusedError(f"model metadata {PREPROCESS_KEY} is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ModelRefusedError(f"model metadata {PREPROCESS_KEY} must be an object")
        mode, size = doc.get("mode"), doc.get("size")
        scale, offset = doc.get("scale"), doc.get("offset", 0.0)
        if mode not in _CHANNELS:
            raise ModelRefusedError(f"model metadata {PREPROCESS_KEY} mode must be L or RGB, got {mode!r}")
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(_is_int(v) and 0 < v <= _MAX_SIDE for v in size)
        ):
            raise ModelRefusedError(f"model metadata {PREPROCESS_KEY} size must be [W, H], positive integers")
        if not _is_number(scale) or not _is_number(offset):
            raise ModelRefusedError(f"model metadata {PREPROCESS_KEY} scale and offset must be finite")
        return cls(mode=mode, width=size[0], height=size[1], scale=float(scale), offset=float(offset))

    def check_against(self, model_shape: Dims) -> None:
        """Refuse a model whose declared input cannot take this spec's tensor."""
        wanted = (1, self.channels, self.height, self.width)
        if len(model_shape) != 4 or any(
            m is not None and m != w for m, w in zip(model_shape, wanted, strict=True)
        ):
            raise ModelRefusedError(
                f"model metadata {PREPROCESS_KEY} makes {_show(wanted)}, model input is {_show(model_shape)}"
            )


def labels_from_metadata(text: str) -> tuple[str, ...]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ModelRefusedError(f"model metadata {LABELS_KEY} is not JSON: {exc}") from None
    if not isinstance(doc, list) or not all(isinstance(v, str) for v in doc) or len(doc) > _MAX_LABELS:
        raise ModelRefusedError(f"model metadata {LABELS_KEY} must be a list of strings")
    return tuple(doc)


def image_to_tensor(data: bytes, spec: ImageSpec, limits: InputLimits) -> FloatArray:
    """Decode a PNG or JPEG and shape it as the model's [1, C, H, W] float32 input."""
    if len(data) > limits.max_image_bytes:
        raise InvalidInputError(f"image is {len(data)} bytes, over the {limits.max_image_bytes}-byte limit")
    pixel_limit = spec.pixel_limit(limits)
    try:
        # open() reads the header only: the declared size is refused before any pixel is decoded.
        with Image.open(io.BytesIO(data), formats=_FORMATS) as image:
            width, height = image.size
            if width * height > pixel_limit:
                raise InvalidInputError(
                    f"image is {width}x{height} pixels, over the {pixel_limit}-pixel limit for this "
                    f"model's {spec.width}x{spec.height} input"
                )
            image.load()
            pixels = _convert(image, spec)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInputError(f"image is over the {pixel_limit}-pixel limit") from None
    except UnidentifiedImageError:
        raise InvalidInputError("not an image: expected PNG or JPEG data") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise InvalidInputError("image is corrupt") from None
    array = np.asarray(pixels, dtype=np.float32) * np.float32(spec.scale) + np.float32(spec.offset)
    if spec.channels == 1:
        array = array[np.newaxis, :, :]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array[np.newaxis, ...], dtype=np.float32)


def _convert(image: Image.Image, spec: ImageSpec) -> Image.Image:
    if image.mode in ("P", "PA"):
        # Palette transparency only converts cleanly through RGBA.
        image = image.convert("RGBA")
    return image.convert(spec.mode).resize((spec.width, spec.height), Image.Resampling.BOX)


def tensor_from_wire(shape: Sequence[int], data: bytes, model_shape: Dims, limits: InputLimits) -> FloatArray:
    """Check a raw tensor (little-endian float32, row-major) against the model's input."""
    shape = tuple(int(d) for d in shape)
    if len(data) > limits.max_tensor_bytes:
        raise InvalidInputError(f"tensor is {len(data)} bytes, over the {limits.max_tensor_bytes}-byte limit")
    if not _shape_fits(shape, model_shape):
        expected = _show(model_shape)
        raise InvalidInputError(f"tensor shape {_show(shape)} does not match model input {expected}")
    needed = 4 * math.prod(shape)
    if len(data) != needed:
        raise InvalidInputError(f"tensor data is {len(data)} bytes, shape {_show(shape)} needs {needed}")
    array = np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32, copy=False)  # no copy on LE
    if not np.isfinite(array).all():
        raise InvalidInputError("tensor contains NaN or infinite values")
    return array


def _shape_fits(shape: tuple[int, ...], model_shape: Dims) -> bool:
    if len(shape) != len(model_shape) or not shape:
        return False
    if any(d <= 0 for d in shape):
        return False
    batch, model_batch = shape[0], model_shape[0]
    if batch != (1 if model_batch is None else model_batch):
        return False
    return all(m is None or m == d for d, m in zip(shape[1:], model_shape[1:], strict=True))


def _show(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
