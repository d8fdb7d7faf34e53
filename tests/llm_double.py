"""TEST DOUBLE of a language model: the ``TextModel`` protocol over bytes, answering by echo.

Not a language model, and never shipped: it stands in for the real loader
(``enclave.llm.loader``) in the serving side's tests, injected through the
daemon's ``text_models`` seam (``enclave._daemon.text_models.TextModelLoader``).

Tokens are the 256 byte values, plus BOS (256) and EOS (257). The chat
template writes each message as ``[role]content\\n``. The answer is the
prompt's own bytes (without BOS) then EOS, so a test knows every token in
advance; ``max_tokens`` cuts it. ``pace``, when set, is acquired before each
token, so a test decides when tokens come; ``computed`` counts the tokens
computed, ``running`` the generations in progress (and ``most_running`` the
most at once).
"""

from __future__ import annotations

import codecs
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from enclave._daemon.text_models import TextModelLoader
from enclave.llm.interface import ROLES, ChatMessage, SamplingParams, TextModel

MAGIC = b"CUSTOS-TEST-DOUBLE echo\n"
# The double also takes any model that carries this (an ONNX metadata key, say): a valid classifier
# so marked passes `custodian model add` and is served as the double, through the daemon's seam.
MARKER = b"custos.test_double.echo"
BOS, EOS = 256, 257


def payload(context_length: int = 64) -> bytes:
    """The 'model file' of a double: recognised by ``loader`` and by nothing else."""
    return MAGIC + json.dumps({"context_length": context_length}).encode()


class ByteDecoder:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(bytes([token_id])) if token_id < 256 else ""

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


@dataclass
class EchoModel:
    context: int = 64
    pace: threading.Semaphore | None = None
    computed: int = 0
    running: int = 0
    most_running: int = 0
    closed: bool = False
    params_seen: list[SamplingParams] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def context_length(self) -> int:
        return self.context

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({EOS})

    @property
    def max_token_bytes(self) -> int:
        return 1  # one token per byte

    def encode_prompt(self, text: str) -> list[int]:
        return [BOS, *text.encode()]

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        for message in messages:
            if message.role not in ROLES:
                raise ValueError(f"unknown role {message.role!r}")
        return [BOS, *"".join(f"[{m.role}]{m.content}\n" for m in messages).encode()]

    def decoder(self) -> ByteDecoder:
        return ByteDecoder()

    def close(self) -> None:
        self.closed = True

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
        self.params_seen.append(params)
        answer = [t for t in prompt if t < 256][: params.max_tokens]
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            for token in answer:
                if self.pace is not None:
                    self.pace.acquire()
                with self._lock:
                    self.computed += 1
                yield token
        finally:
            with self._lock:
                self.running -= 1


def answer_of(text: str) -> str:
    """What the double answers to a raw prompt: the prompt itself."""
    return text


def loader(model: EchoModel | None = None) -> TextModelLoader:
    """The seam filled with the double: payloads starting with ``MAGIC`` load as ``model``."""

    def recognises(data: bytes | bytearray) -> bool:
        return bytes(data[: len(MAGIC)]) == MAGIC or MARKER in data

    def load(data: bytearray, intra_op_threads: int) -> TextModel:
        loaded = model or EchoModel()
        if bytes(data[: len(MAGIC)]) == MAGIC:
            loaded.context = int(json.loads(bytes(data[len(MAGIC) :]))["context_length"])
        return loaded

    return TextModelLoader(recognises, load)
