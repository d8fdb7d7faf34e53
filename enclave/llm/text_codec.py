"""Text to token ids and back: the model's tokenizer, its chat template, and a streaming decoder.

The tokenizer is built from its JSON document in memory. The chat template is the model's own
Jinja template (from the GGUF's ``tokenizer.chat_template``), rendered in Jinja's immutable sandbox
as Hugging Face's ``apply_chat_template`` renders it (``trim_blocks``, ``lstrip_blocks``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``).

Generated ids are decoded through a table of each token's bytes (byte-level BPE maps every byte to
a printable character), so a character split across tokens comes out whole, once its last byte is
in; control tokens (end of turn and the like) decode to nothing.

Chat messages are written by end users: text in them that spells a control token (``<|im_end|>``)
must not become one, or a user could end a turn and forge the next. The template is rendered with a
placeholder in place of each message's content; the template's own text is encoded with its control
tokens, each message's content as plain text.
"""

from __future__ import annotations

import codecs
import json
import re
import secrets
from collections.abc import Sequence
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from enclave.errors import FormatError
from enclave.llm.bundle import TextModelInfo
from enclave.llm.interface import ROLES, ChatMessage


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level map, reversed: the printable character standing for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class ByteDecoder:
    """``TokenDecoder`` over a table of token bytes; an incomplete UTF-8 sequence waits for the next token."""

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        piece = self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""
        return self._utf8.decode(piece, final=False)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class TextCodec:
    def __init__(self, tokenizer_json: bytes, info: TextModelInfo) -> None:
        try:
            text = tokenizer_json.decode()
            self._tokenizer = Tokenizer.from_str(text)
            # The same tokenizer reading control-token text as text: for what users wrote.
            self._plain = Tokenizer.from_str(text)
            self._plain.encode_special_tokens = True
            document = json.loads(text)
            vocab: dict[str, int] = document["model"]["vocab"]
            control = {t["id"] for t in document.get("added_tokens", ()) if t.get("special")}
        except Exception as exc:  # tokenizers raises a bare Exception; json and decode ValueError
            raise FormatError(f"tokenizer does not load: {exc}") from None
        self._info = info
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        alphabet = byte_level_alphabet()
        table = [b""] * max(self.vocab_size, info.vocab_size)
        # The most text one token stands for (control tokens' own text included): a prompt longer
        # than this times the context cannot fit it, and is refused before the tokenizer runs.
        self.max_token_bytes = 1
        for token, index in vocab.items():
            piece = bytes(alphabet[c] for c in token) if all(c in alphabet for c in token) else token.encode()
            self.max_token_bytes = max(self.max_token_bytes, len(piece), len(token.encode()))
            if 0 <= index < len(table) and index not in control:
                table[index] = piece
        self.token_bytes: tuple[bytes, ...] = tuple(table)
        self._template = None
        if info.chat_template is not None:
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.globals["raise_exception"] = _raise
            try:
                self._template = environment.from_string(info.chat_template)
            except TemplateError as exc:
                raise FormatError(f"chat template does not compile: {exc}") from None

    def encode_prompt(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        if self._info.add_bos_token and self._info.bos_token_id is not None:
            return [self._info.bos_token_id, *ids]
        return ids

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain prompt")
        for message in messages:
            if message.role not in ROLES:
                raise ValueError(f"message role {message.role!r} is not one of {', '.join(ROLES)}")
        # Placeholders no message can hold (a fresh random word each time), one per message.
        marker = f"\x00custos-{secrets.token_hex(8)}-"
        try:
            text = self._template.render(
                messages=[{"role": m.role, "content": f"{marker}{i}\x00"} for i, m in enumerate(messages)],
                add_generation_prompt=True,
                bos_token=self._info.bos_token,
                eos_token=self._info.eos_token,
            )
        except TemplateError as exc:
            raise ValueError(f"the chat template refused these messages: {exc}") from None
        ids: list[int] = []
        # Odd pieces are message numbers: "template, 0, template, 1, ..., template".
        for position, piece in enumerate(re.split(f"{re.escape(marker)}(\\d+)\x00", text)):
            if position % 2 == 0:
                if marker in piece:
                    raise ValueError("the chat template alters message content; this enclave cannot use it")
                ids += self._tokenizer.encode(piece, add_special_tokens=False).ids if piece else []
                continue
            content = messages[int(piece)].content
            if content:
                ids += self._plain.encode(content, add_special_tokens=False).ids
        return ids

    def decoder(self) -> ByteDecoder:
        return ByteDecoder(self.token_bytes)


def _raise(message: Any) -> NoReturn:
    raise TemplateError(str(message))
