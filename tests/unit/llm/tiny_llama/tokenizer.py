"""The tiny Llama's byte-level BPE tokenizer, trained in code on a fixed text (deterministic)."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_ID = 2  # <|im_end|>, as in SmolLM2's chat models
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

_TEXT = (
    "The custodian lends a model to an enclave. The enclave proves what it runs before it is trusted.\n"
    "Every token is counted, and the lease says how many tokens may still be produced.\n"
    "A user asks a question; the assistant answers in a few words. Numbers like 2026 and 135 are split.\n"
    "Hello, world! How are you today? I am fine, thank you. Où est la gare ? 東京 is far away.\n"
)


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TEXT] * 4, trainer=trainer)
    return tokenizer


def vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[str]]:
    """Tokens in id order and merges as ``"a b"`` strings, as GGUF's tokenizer.ggml.* keep them."""
    model = json.loads(tokenizer.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
    assert [i for _, i in by_id] == list(range(len(by_id)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in by_id], merges
