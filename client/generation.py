"""A language model's answer as it streams from a verified enclave: ``Connection.generate``.

The request is checked here before anything is sent (the enclave checks it again
against the model: its context, its template). The answer is an iterator of
``Delta``; once it has ended, ``usage`` holds the tokens charged and the finish
reason. ``cancel`` (or leaving a ``with`` block early) ends the stream: the
enclave stops computing and charges only the tokens produced until then.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from client.errors import ClientError, InvalidInputError, ModelChangedError
from enclave.llm.interface import ROLES, ChatMessage
from protos import custos_pb2

MAX_STOP_STRINGS = 4
MAX_STOP_BYTES = 64
MAX_TOP_K = 1000
MAX_TEMPERATURE = 2.0
MAX_SEED = (1 << 64) - 1
# max_tokens fits the wire's uint32; the enclave bounds it by the model's context.
MAX_TOKENS = (1 << 32) - 1
MAX_PROMPT_BYTES = 1 << 20
FINISH_REASONS = ("stop", "length", "quota", "cancelled")

Message = ChatMessage | Mapping[str, str]


@dataclass(frozen=True)
class Delta:
    """Text to append, and the completion tokens it accounts for."""

    text: str
    tokens: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # stop, length, quota (the deployment's tokens ran out), or cancelled (by this client).
    finish_reason: str
    # Tokens left to the enclave's deployment, as far as it knows (0 when cancelled: unknown).
    remaining_quota: int


def generate_request(
    prompt: str | None,
    messages: Sequence[Message] | None,
    *,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int,
    seed: int | None,
    stop: Sequence[str],
) -> custos_pb2.GenerateRequest:
    """The wire request, or ``InvalidInputError`` saying what is wrong (nothing is sent then)."""
    if (prompt is None) == (messages is None):
        raise InvalidInputError("give a prompt or chat messages, not both and not neither")
    request = custos_pb2.GenerateRequest(
        max_tokens=_integer("max_tokens", max_tokens, 0, MAX_TOKENS),
        top_k=_integer("top_k", top_k, 0, MAX_TOP_K),
    )
    if temperature is not None:
        request.temperature = _number("temperature", temperature, 0, MAX_TEMPERATURE)
    if top_p is not None:
        request.top_p = _number("top_p", top_p, 0, 1)
        if request.top_p <= 0:
            raise InvalidInputError("top_p must be above 0 and at most 1")
    if seed is not None:
        request.seed = _integer("seed", seed, 0, MAX_SEED)
    if isinstance(stop, str):
        stop = [stop]
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidInputError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for text in stop:
        data = _utf8(text, "a stop string")
        if not 0 < len(data) <= MAX_STOP_BYTES:
            raise InvalidInputError(f"a stop string must be 1 to {MAX_STOP_BYTES} bytes of UTF-8")
        request.stop.append(data)
    if prompt is not None:
        data = _utf8(prompt, "prompt")
        if not data:
            raise InvalidInputError("prompt is empty")
        request.prompt = _bounded(data)
        return request
    assert messages is not None
    if not messages:
        raise InvalidInputError("the chat has no messages")
    for number, message in enumerate(messages, start=1):
        role, content = _role_and_content(message, number)
        request.chat.messages.append(
            custos_pb2.ChatMessage(role=role, content=_utf8(content, f"message {number}'s content"))
        )
    _bounded(b"".join(m.content for m in request.chat.messages))
    return request


class Generation(Iterator[Delta]):
    """One streaming answer. Iterate for ``Delta``; ``usage`` once it has ended."""

    def __init__(
        self,
        call: Any,
        *,
        model_sha384: str,
        explain: Callable[[grpc.RpcError], ClientError],
    ) -> None:
        self._call = call
        self._model_sha384 = model_sha384
        self._explain = explain
        self.usage: Usage | None = None
        self.text = ""

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> Delta:
        if self.usage is not None:
            raise StopIteration
        try:
            chunk: custos_pb2.GenerateChunk = next(self._call)
        except StopIteration:
            raise ClientError("the enclave ended the answer without its usage") from None
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.CANCELLED and self.usage:
                raise StopIteration from None
            raise self._explain(exc) from None
        if chunk.WhichOneof("part") == "end":
            end = chunk.end
            if end.model_sha384 != self._model_sha384:
                raise ModelChangedError(
                    f"enclave answered with model {end.model_sha384 or '(none)'}, but attested model "
                    f"{self._model_sha384}; connect again to verify the model it serves now"
                )
            self.usage = Usage(
                end.prompt_tokens, end.completion_tokens, end.finish_reason, end.remaining_quota
            )
            raise StopIteration
        self.text += chunk.delta.text
        return Delta(chunk.delta.text, chunk.delta.tokens)

    def cancel(self) -> None:
        """Stop the answer here: the enclave stops computing, and charges what it produced."""
        if self.usage is None:
            self._call.cancel()
            self.usage = Usage(0, 0, "cancelled", 0)

    def __enter__(self) -> Generation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


def _role_and_content(message: Message, number: int) -> tuple[str, str]:
    if isinstance(message, ChatMessage):
        role, content = message.role, message.content
    else:
        role, content = message.get("role", ""), message.get("content", "")
    if role not in ROLES:
        raise InvalidInputError(f"message {number} has unknown role {role!r} (one of {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise InvalidInputError(f"message {number}'s content is not text")
    return role, content


def _utf8(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} is not text")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{what} is not valid UTF-8 (it holds a lone surrogate)") from None


def _bounded(data: bytes) -> bytes:
    if len(data) > MAX_PROMPT_BYTES:
        raise InvalidInputError(f"the prompt is over {MAX_PROMPT_BYTES} bytes")
    return data


def _integer(name: str, value: int, low: int, high: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise InvalidInputError(f"{name} must be {low} to {high}, got {number}")
    return number


def _number(name: str, value: float, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidInputError(f"{name} must be {low:g} to {high:g}, got {value:g}")
    return float(value)
