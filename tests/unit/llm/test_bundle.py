"""The language-model bundle: every malformed bundle is refused by name before anything loads."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import pytest

from enclave._daemon.errors import ModelRefusedError
from enclave.llm.bundle import read_bundle
from enclave.llm.loader import is_text_model, load_text_model


def _index(bundle: bytes) -> tuple[int, dict[str, object]]:
    offset = struct.unpack_from("<Q", bundle, 16)[0]
    return offset, json.loads(bundle[offset:])


def _with_index(bundle: bytes, change: Callable[[dict[str, object]], None]) -> bytes:
    offset, index = _index(bundle)
    change(index)
    encoded = json.dumps(index).encode()
    return bundle[:16] + struct.pack("<QQ", offset, len(encoded)) + bundle[32:offset] + encoded


def _section(name: str, bounds: list[int]) -> Callable[[dict[str, object]], None]:
    return lambda index: index["sections"].__setitem__(name, bounds)  # type: ignore[attr-defined]


def _metadata(key: str, value: object) -> Callable[[dict[str, object]], None]:
    return lambda index: index["metadata"].__setitem__(key, value)  # type: ignore[attr-defined]


BROKEN: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("truncated", lambda b: b[:40], "truncated"),
    ("magic", lambda b: b"NOTCUSTO" + b[8:], "not a language-model bundle"),
    ("version", lambda b: b[:8] + struct.pack("<I", 9) + b[12:], "version 9 is not supported"),
    ("index-cut", lambda b: b[:-5], "index is out of bounds"),
    ("index-json", lambda b: b[:-2] + b"!!", "index is malformed"),
    (
        "section-past-end",
        lambda b: _with_index(b, _section("graph", [64, 1 << 40])),
        "section graph is out of bounds",
    ),
    (
        "section-type",
        lambda b: _with_index(b, _section("tokenizer", ["a", 1])),
        "section tokenizer is malformed",
    ),
    ("context", lambda b: _with_index(b, _metadata("context_length", 0)), "context_length is not a positive"),
    ("eos-id", lambda b: _with_index(b, _metadata("eos_token_ids", [10**6])), "outside the vocabulary"),
    ("unknown-key", lambda b: _with_index(b, _metadata("surprise", 1)), "metadata is malformed"),
    ("graph-bytes", lambda b: _with_index(b, _section("graph", [64, 64])), "graph is not an ONNX model"),
    ("tokenizer-bytes", lambda b: _with_index(b, _section("tokenizer", [64, 64])), "tokenizer does not load"),
]


@pytest.mark.parametrize(("breaks", "message"), [pytest.param(f, m, id=i) for i, f, m in BROKEN])
def test_a_malformed_bundle_is_refused_by_the_loader(
    tiny_bundle: bytes, breaks: Callable[[bytes], bytes], message: str
) -> None:
    payload = bytearray(breaks(tiny_bundle))
    with pytest.raises(ModelRefusedError, match=message):
        load_text_model(payload, intra_op_threads=1)
    assert not any(payload)


def test_the_bundle_is_told_from_an_onnx_classifier_by_its_magic(tiny_bundle: bytes) -> None:
    assert is_text_model(tiny_bundle)
    assert not is_text_model(b"\x08\x07\x12\x04onnx")
    assert read_bundle(tiny_bundle).graph.tobytes().startswith(b"\x08")
