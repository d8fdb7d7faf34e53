"""What the enclave's serving side needs from a language model: text in, token ids out.

The loading side (``enclave.llm`` loaders, the custodian's GGUF conversion) and the
serving side (the ``Generate`` RPC, per-token metering, ``custos-query chat``,
``custos-proxy``) meet here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # 1 means no nucleus cut
    top_k: int = 0  # 0 means no limit
    seed: int | None = None  # None: a fresh seed per call


class TokenDecoder(Protocol):
    """Turns generated token ids into text deltas, holding back an incomplete UTF-8 sequence."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class TextModel(Protocol):
    """One loaded language model. ``generate`` may run in several threads at once, each with its own cache."""

    @property
    def context_length(self) -> int: ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one token stands for: bounds a prompt that fits the context."""
        ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The messages through the model's chat template; ``ValueError`` for a role outside ``ROLES``."""
        ...

    def decoder(self) -> TokenDecoder: ...

    def close(self) -> None:
        """Zero what the model holds of its weights; it generates nothing after (``RuntimeError``)."""
        ...

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Token ids one at a time, ending at an end-of-sequence token (not yielded) or ``max_tokens``.

        The caller may stop iterating at any point (a cancelled stream); nothing more is computed.
        """
        ...
