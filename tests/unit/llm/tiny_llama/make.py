"""Write the tiny Llama as a GGUF file, laid out as llama.cpp's converter writes a Llama.

``python -m tests.unit.llm.tiny_llama.make`` rewrites ``tiny-llama.gguf`` next to this file; the
output is the same byte for byte on every run (a test checks the committed file against it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np

from tests.unit.llm.tiny_llama.tokenizer import CHAT_TEMPLATE, EOS_ID, train_tokenizer, vocabulary
from tests.unit.llm.tiny_llama.weights import SHAPE, STORAGE, TinyShape, tiny_tensors

GGUF_PATH = Path(__file__).with_name("tiny-llama.gguf")
BOS_ID = 1


def interleave_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's half-split rotary rows to GGML's adjacent pairs (what llama.cpp's converter does)."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, -1).swapaxes(1, 2).reshape(rows.shape)


def write_gguf(
    path: Path,
    shape: TinyShape = SHAPE,
    *,
    architecture: str = "llama",
    tokenizer_model: str = "gpt2",
    pre: str = "gpt2",
    leave_out: str = "",
    types: dict[str, str] | None = None,
    rope_factors: np.ndarray | None = None,
) -> None:
    """The tiny Llama; the keyword arguments make the variants the tests need (``rope_factors``:
    Llama 3.1's per-frequency divisors, ``rope_freqs.weight``)."""
    tokenizer = train_tokenizer(shape.vocab)
    tokens, merges = vocabulary(tokenizer)
    assert len(tokens) == shape.vocab, len(tokens)
    storage = STORAGE | (types or {})
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name("custos tiny llama")
    writer.add_block_count(shape.layers)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(shape.vocab)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i < 3 else 1 for i in range(len(tokens))])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    qwen2 = architecture == "qwen2"  # llama.cpp neither interleaves its rotary rows nor drops biases
    for name, (_, stored) in tiny_tensors(shape, qkv_bias=qwen2).items():
        if name == leave_out:
            continue
        if name.endswith(("attn_q", "attn_k")) and not qwen2:
            stored = interleave_rotary(stored, shape.heads if name.endswith("attn_q") else shape.kv_heads)
        kind = gguf.GGMLQuantizationType[storage.get(name, "F32")]
        if kind == gguf.GGMLQuantizationType.I8:  # a type no Llama uses, for the refusal test
            stored = stored.astype(np.int8)
        raw = kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        full = name if name.endswith(".bias") else f"{name}.weight"
        writer.add_tensor(full, np.ascontiguousarray(stored), raw_dtype=kind if raw else None)
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    write_gguf(Path(sys.argv[1]) if len(sys.argv) > 1 else GGUF_PATH)
