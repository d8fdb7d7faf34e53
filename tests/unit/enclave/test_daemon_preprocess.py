"""Input validation and shaping: images and tensors, with a table of refusals."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from enclave._daemon.errors import InvalidInputError, ModelRefusedError
from enclave._daemon.preprocess import (
    ImageSpec,
    InputLimits,
    image_to_tensor,
    labels_from_metadata,
    tensor_from_wire,
)

LIMITS = InputLimits(max_image_bytes=64 * 1024, max_image_pixels=256 * 256, max_tensor_bytes=4096)
GRAY = ImageSpec(mode="L", width=2, height=2, scale=1 / 255)
MODEL_SHAPE = (None, 1, 2, 2)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def gray(values: list[list[int]]) -> Image.Image:
    return Image.fromarray(np.array(values, dtype=np.uint8), mode="L")


def test_gray_png_becomes_scaled_nchw_tensor() -> None:
    tensor = image_to_tensor(encode(gray([[0, 255], [51, 102]])), GRAY, LIMITS)
    assert tensor.dtype == np.float32
    assert tensor.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(tensor[0, 0], [[0.0, 1.0], [0.2, 0.4]], rtol=1e-6)


def test_box_resize_averages_blocks_and_offset_applies() -> None:
    image = gray([[0, 0, 100, 100], [0, 0, 100, 100], [200, 200, 40, 40], [200, 200, 40, 40]])
    spec = ImageSpec(mode="L", width=2, height=2, scale=0.5, offset=-1.0)
    tensor = image_to_tensor(encode(image), spec, LIMITS)
    np.testing.assert_allclose(tensor[0, 0], [[-1.0, 49.0], [99.0, 19.0]])


def test_rgb_channels_come_first() -> None:
    image = Image.new("RGB", (1, 1), (255, 128, 0))
    spec = ImageSpec(mode="RGB", width=1, height=1, scale=1.0)
    tensor = image_to_tensor(encode(image), spec, LIMITS)
    assert tensor.shape == (1, 3, 1, 1)
    np.testing.assert_array_equal(tensor.reshape(-1), [255.0, 128.0, 0.0])


def test_jpeg_and_palette_images_are_accepted() -> None:
    assert image_to_tensor(encode(Image.new("RGB", (8, 8), (9, 9, 9)), "JPEG"), GRAY, LIMITS).shape == (
        1,
        1,
        2,
        2,
    )
    palette = Image.new("P", (3, 3))
    palette.info["transparency"] = 0
    assert image_to_tensor(encode(palette), GRAY, LIMITS).shape == (1, 1, 2, 2)


NOISE_PNG = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)))
BIG_NOISE = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)))


def corrupt_png() -> bytes:
    data = bytearray(NOISE_PNG)
    start = data.index(b"IDAT") + 8
    data[start : start + 40] = bytes(40)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "not an image", id="empty"),
        pytest.param(b"hello, world", "not an image", id="text"),
        pytest.param(encode(Image.new("L", (2, 2)), "GIF"), "not an image", id="gif-not-accepted"),
        pytest.param(NOISE_PNG[: len(NOISE_PNG) // 2], "image is corrupt", id="truncated-png"),
        pytest.param(corrupt_png(), "image is corrupt", id="corrupt-png"),
        pytest.param(BIG_NOISE, "over the 65536-byte limit", id="too-many-bytes"),
        pytest.param(png_header_only(300, 300), "over the 65536-pixel limit", id="too-many-pixels"),
        pytest.param(png_header_only(20000, 20000), "pixel limit", id="decompression-bomb"),
    ],
)
def test_bad_images_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidInputError, match=reason):
        image_to_tensor(data, GRAY, LIMITS)


def test_raw_tensor_is_checked_and_decoded() -> None:
    values = np.array([1.5, -2.0, 0.25, 8.0], dtype="<f4")
    tensor = tensor_from_wire([1, 1, 2, 2], values.tobytes(), MODEL_SHAPE, LIMITS)
    np.testing.assert_array_equal(tensor.reshape(-1), values)
    assert tensor.dtype == np.float32


@pytest.mark.parametrize(
    ("shape", "data", "reason"),
    [
        pytest.param(
            [1, 2, 2], bytes(16), "tensor shape [1, 2, 2] does not match model input [?, 1, 2, 2]", id="rank"
        ),
        pytest.param([1, 1, 2, 3], bytes(24), "does not match model input", id="wrong-dim"),
        pytest.param([2, 1, 2, 2], bytes(32), "does not match model input", id="batch-of-two"),
        pytest.param([1, 1, 0, 2], b"", "does not match model input", id="zero-dim"),
        pytest.param([1, -1, 2, 2], bytes(16), "does not match model input", id="negative-dim"),
        pytest.param([], b"", "does not match model input", id="scalar"),
        pytest.param(
            [1, 1, 2, 2], bytes(32), "tensor data is 32 bytes, shape [1, 1, 2, 2] needs 16", id="float64"
        ),
        pytest.param([1, 1, 2, 2], bytes(15), "needs 16", id="short"),
        pytest.param([1, 1, 2, 2], bytes(8192), "over the 4096-byte limit", id="too-large"),
        pytest.param([1, 1, 2, 2], np.array([np.nan, 0, 0, 0], "<f4").tobytes(), "NaN", id="nan"),
        pytest.param([1, 1, 2, 2], np.array([np.inf, 0, 0, 0], "<f4").tobytes(), "infinite", id="inf"),
    ],
)
def test_bad_tensors_are_refused(shape: list[int], data: bytes, reason: str) -> None:
    with pytest.raises(
        InvalidInputError, match=reason.replace("[", r"\[").replace("]", r"\]").replace("?", r"\?")
    ):
        tensor_from_wire(shape, data, MODEL_SHAPE, LIMITS)


def test_static_batch_dimension_must_match() -> None:
    tensor_from_wire([1, 1, 2, 2], bytes(16), (1, 1, 2, 2), LIMITS)
    with pytest.raises(InvalidInputError):
        tensor_from_wire([2, 1, 2, 2], bytes(32), (1, 1, 2, 2), LIMITS)


def test_spec_from_metadata() -> None:
    spec = ImageSpec.from_metadata(
        json.dumps({"mode": "RGB", "size": [224, 160], "scale": 0.5, "offset": -1})
    )
    assert spec == ImageSpec(mode="RGB", width=224, height=160, scale=0.5, offset=-1.0)
    assert spec.channels == 3
    spec.check_against((None, 3, 160, 224))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("not json", id="not-json"),
        pytest.param("[]", id="not-object"),
        pytest.param('{"mode": "CMYK", "size": [2, 2], "scale": 1}', id="bad-mode"),
        pytest.param('{"mode": "L", "size": [2], "scale": 1}', id="size-arity"),
        pytest.param('{"mode": "L", "size": [0, 2], "scale": 1}', id="size-zero"),
        pytest.param('{"mode": "L", "size": [true, 2], "scale": 1}', id="size-bool"),
        pytest.param('{"mode": "L", "size": [2, 2]}', id="no-scale"),
        pytest.param('{"mode": "L", "size": [2, 2], "scale": "1"}', id="scale-string"),
        pytest.param('{"mode": "L", "size": [2, 2], "scale": 1, "offset": NaN}', id="offset-nan"),
    ],
)
def test_bad_preprocess_metadata_refuses_the_model(text: str) -> None:
    with pytest.raises(ModelRefusedError):
        ImageSpec.from_metadata(text)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((None, 3, 2, 2), id="channels"),
        pytest.param((None, 1, 3, 2), id="height"),
        pytest.param((None, 1, 2), id="rank"),
        pytest.param((4, 1, 2, 2), id="batch"),
    ],
)
def test_spec_must_fit_the_model_input(shape: tuple[int | None, ...]) -> None:
    with pytest.raises(ModelRefusedError, match="model input is"):
        GRAY.check_against(shape)


def test_labels_metadata() -> None:
    assert labels_from_metadata('["cat", "dog"]') == ("cat", "dog")
    for bad in ("{", '{"a": 1}', "[1, 2]"):
        with pytest.raises(ModelRefusedError):
            labels_from_metadata(bad)


def truncated_png(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` gray pixels, cut off inside its pixel data."""
    rows = b"".join(b"\x00" + bytes(width) for _ in range(min(height, 64)))
    header = png_header_only(width, height)[:-12]  # without IEND
    body = zlib.compress(rows)
    idat = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    return header + idat


DAEMON_LIMITS = InputLimits(max_image_bytes=8 << 20, max_image_pixels=4096 * 4096, max_tensor_bytes=16 << 20)
DIGITS = ImageSpec(mode="L", width=28, height=28, scale=1 / 255)


def test_declared_pixels_are_limited_by_the_model_input_before_decoding() -> None:
    """Issue 13 item 4: a small truncated PNG declaring 4096x4096 pixels is refused from its header.

    It is within the daemon's absolute pixel bound, so it used to be decoded in full (about 90 ms
    of CPU) before being refused as corrupt.
    """
    data = truncated_png(4096, 4096)
    assert len(data) < 64 * 1024
    with pytest.raises(InvalidInputError, match="over the 1048576-pixel limit for this model's 28x28 input"):
        image_to_tensor(data, DIGITS, DAEMON_LIMITS)


@pytest.mark.parametrize(
    ("spec", "side", "accepted"),
    [
        pytest.param(DIGITS, 1024, True, id="small-model-takes-a-megapixel"),
        pytest.param(DIGITS, 1025, False, id="small-model-past-a-megapixel"),
        pytest.param(ImageSpec(mode="L", width=224, height=224, scale=1.0), 1792, True, id="8x-each-side"),
        pytest.param(ImageSpec(mode="L", width=224, height=224, scale=1.0), 1793, False, id="past-8x"),
    ],
)
def test_pixel_limit_scales_with_the_model_input(spec: ImageSpec, side: int, accepted: bool) -> None:
    data = encode(Image.new("L", (side, side)))
    if accepted:
        assert image_to_tensor(data, spec, DAEMON_LIMITS).shape == (1, 1, spec.height, spec.width)
    else:
        with pytest.raises(InvalidInputError, match="pixel limit for this model"):
            image_to_tensor(data, spec, DAEMON_LIMITS)
