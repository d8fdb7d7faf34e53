"""The committed tiny Llama is what its script makes, small, and as llama.cpp lays out a Llama."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from custodian.llm.block_quant import BlockQuantized, from_ggml
from custodian.llm.gguf_model import GgufModel
from custodian.llm.gguf_tokenizer import tokenizer_of
from tests.unit.llm.tiny_llama.make import GGUF_PATH, interleave_rotary, write_gguf
from tests.unit.llm.tiny_llama.tokenizer import train_tokenizer
from tests.unit.llm.tiny_llama.weights import SHAPE, STORAGE, tiny_weights


def test_the_committed_file_is_what_the_script_writes(tmp_path: Path) -> None:
    write_gguf(tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == GGUF_PATH.read_bytes()
    assert GGUF_PATH.stat().st_size < 1 << 20


def test_every_weight_dequantises_bit_for_bit_to_what_the_script_drew() -> None:
    model = GgufModel(GGUF_PATH)
    for name, values in tiny_weights().items():
        assert np.array_equal(model.weight(name), values), name


def test_matrices_kept_in_their_blocks_hold_the_same_weights() -> None:
    model = GgufModel(GGUF_PATH)
    for name, values in tiny_weights().items():
        weight = model.weight(name, keep_blocks=True)
        if isinstance(weight, BlockQuantized):  # Q4_1's minimum becomes a float zero point: rounding only
            assert STORAGE[name] in ("Q4_1", "Q8_0")
            np.testing.assert_allclose(weight.dequantize(), values, rtol=0, atol=1e-6, err_msg=name)
        else:
            assert np.array_equal(weight, values), name


def test_a_q4_1_block_whose_scale_is_zero_keeps_its_minimum() -> None:
    block = np.zeros(20, dtype=np.uint8)
    block[2:4] = np.array([-0.75], dtype=np.float16).view(np.uint8)
    block[4:] = 0xA7  # nibbles that a zero scale makes irrelevant
    weight = from_ggml("Q4_1", np.tile(block, (2, 1)), 2, 32)
    assert np.array_equal(weight.dequantize(), np.full((2, 32), -0.75, dtype=np.float32))


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


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        pytest.param("gpt2", ["Hello", "Ġworld", "'s", "Ġ12345", "!!"], id="gpt2"),
        pytest.param("smollm", ["Hello", "Ġworld", "'s", "Ġ", "1", "2", "3", "4", "5", "!!"], id="smollm"),
        pytest.param("llama-bpe", ["Hello", "Ġworld", "'s", "Ġ", "123", "45", "!!"], id="llama-bpe"),
        pytest.param("qwen2", ["Hello", "Ġworld", "'s", "Ġ", "1", "2", "3", "4", "5", "!!"], id="qwen2"),
    ],
)
def test_each_named_pre_tokenizer_splits_as_its_model_does(
    tmp_path: Path, pre: str, pieces: list[str]
) -> None:
    path = tmp_path / f"{pre}.gguf"
    write_gguf(path, pre=pre)
    tokenizer = Tokenizer.from_str(tokenizer_of(GgufModel(path)).json)
    assert tokenizer.pre_tokenizer is not None
    split = tokenizer.pre_tokenizer.pre_tokenize_str("Hello world's 12345!!")
    assert [piece for piece, _ in split] == pieces
