"""A GGUF file's tokenizer (``tokenizer.ggml.*``) as a Hugging Face ``tokenizers`` JSON document.

GGUF keeps the vocabulary, merges and token types, and names the pre-tokenizer (``pre``) rather
than storing it; each name that Custos knows maps to the split its model was trained with. Only
GPT-2-style byte-level BPE (``tokenizer.ggml.model = gpt2``: SmolLM2, Llama 3, Qwen 2.5) is
converted; SentencePiece vocabularies (``llama``: Llama 2, Mistral 7B v0.1-0.3) are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from custodian.errors import ModelFormatError
from custodian.llm.gguf_model import GgufModel

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_then_bytes(pattern: str) -> dict[str, Any]:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {**_BYTE_LEVEL, "use_regex": False},
        ],
    }


# tokenizer.ggml.pre to the pre-tokenizer, as the models' own tokenizer.json files define them.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt2": _BYTE_LEVEL,
    "default": _BYTE_LEVEL,
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
    },
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4
# Chat models end a turn with a token that is not always the file's eos_token_id (Llama 3's
# <|eot_id|>, Qwen's <|im_end|>); any of these that is a control token stops generation.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>", "</s>")


@dataclass(frozen=True)
class GgufTokenizer:
    json: str  # the tokenizers document
    bos_token_id: int | None
    add_bos_token: bool
    eos_token_ids: frozenset[int]
    chat_template: str | None
    bos_token: str
    eos_token: str


def tokenizer_of(model: GgufModel) -> GgufTokenizer:
    kind = model.string("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelFormatError(
            f"GGUF tokenizer {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)"
            + (
                " (SentencePiece vocabularies such as Llama 2's and Mistral's are not)"
                if kind == "llama"
                else ""
            )
        )
    pre = model.string("tokenizer.ggml.pre", default="default")
    if pre not in PRE_TOKENIZERS:
        raise ModelFormatError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    tokens = _strings(model, "tokenizer.ggml.tokens")
    merges = _strings(model, "tokenizer.ggml.merges")
    types = model.field("tokenizer.ggml.token_type")
    if not isinstance(types, list) or len(types) != len(tokens):
        raise ModelFormatError("GGUF tokenizer.ggml.token_type is missing or does not match the tokens")
    special = {i for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)}
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": tokens[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": types[i] == _CONTROL,
            }
            for i in sorted(special)
        ],
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": {**_BYTE_LEVEL, "add_prefix_space": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": pre == "llama-bpe",
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": [merge.split(" ", 1) for merge in merges],
        },
    }
    if len(set(tokens)) != len(tokens):
        raise ModelFormatError("GGUF tokenizer.ggml.tokens holds the same token twice")
    bos, eos = _id(model, "bos_token_id", len(tokens)), _id(model, "eos_token_id", len(tokens))
    ends = {
        i
        for key in ("eos_token_id", "eot_token_id", "eom_token_id")
        if (i := _id(model, key, len(tokens))) is not None
    }
    ends |= {i for i in special if types[i] == _CONTROL and tokens[i] in _END_OF_TURN}
    if not ends:
        raise ModelFormatError("GGUF tokenizer names no end-of-sequence token")
    template = model.field("tokenizer.chat_template")
    add_bos = model.field("tokenizer.ggml.add_bos_token")
    return GgufTokenizer(
        json=json.dumps(document, ensure_ascii=False),
        bos_token_id=bos,
        add_bos_token=bool(add_bos) and bos is not None,
        eos_token_ids=frozenset(ends),
        chat_template=template if isinstance(template, str) else None,
        bos_token=tokens[bos] if bos is not None else "",
        eos_token=tokens[eos] if eos is not None else "",
    )


def _strings(model: GgufModel, key: str) -> list[str]:
    value = model.field(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelFormatError(f"GGUF {key} is missing or not a list of strings")
    return value


def _id(model: GgufModel, key: str, vocab: int) -> int | None:
    value = model.field(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < vocab:
        raise ModelFormatError(f"GGUF tokenizer.ggml.{key} is not a token id")
    return value
