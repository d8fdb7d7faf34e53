"""The committed tiny Llama is what its script makes, small, and as llama.cpp lays out a Llama."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from custodian.llm.gguf_model import GgufModel
from custodian.llm.gguf_tokenizer import tokenizer_of
from tests.unit.llm.tiny_llama.make import GGUF_PATH, interleave_rotary, write_gguf
from tests.unit.llm.tiny_llama.tokenizer import train_tokenizer
from tests.unit.llm.tiny_llama.weights import SHAPE, tiny_weights


def test_the_committed_file_is_what_the_script_writes(tmp_path: Path) -> None:
    write_gguf(tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == GGUF_PATH.read_bytes()
    assert GGUF_PATH.stat().st_size < 1 << 20


def test_every_weight_reads_back_bit_for_bit_through_dequantisation() -> None:
    model = GgufModel(GGUF_PATH)
    for name, values in tiny_weights().items():
        assert np.array_equal(model.weight(name), values), name


def test_query_and_key_rows_are_stored_interleaved_as_llama_cpp_stores_them() -> None:
    rows = np.arange(SHAPE.head_dim, dtype=np.float32)[:, None]
    assert interleave_rotary(rows, 1)[:4, 0].tolist() == [0, SHAPE.head_dim // 2, 1, SHAPE.head_dim // 2 + 1]


def test_the_tokenizer_rebuilt_from_gguf_metadata_encodes_as_the_original() -> None:
    rebuilt = Tokenizer.from_str(tokenizer_of(GgufModel(GGUF_PATH)).json)
    original = train_tokenizer(SHAPE.vocab)
    for text in [
        "The enclave proves what it runs, 2026!",
        "Où? 東京\n\n  x",
        "<|im_start|>user\nhi<|im_end|>",
    ]:
        assert rebuilt.encode(text).ids == original.encode(text).ids
