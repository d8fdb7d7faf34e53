"""A ``GenerateRequest`` checked and tokenized: what a generation will run, or why it will not.

Everything here happens before any quota is reserved, so a refused request costs
nothing. Sizes are bounded before the tokenizer runs: the tokenizer's work is
what an unauthenticated caller can cause for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from enclave._daemon.errors import InvalidInputError
from enclave.llm.interface import ROLES, ChatMessage, SamplingParams, TextModel
from protos import custos_pb2

MAX_STOP_STRINGS = 4
MAX_STOP_BYTES = 64
MAX_TOP_K = 1000
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class PromptLimits:
    max_prompt_bytes: int
    max_messages: int


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    # max_tokens as asked (0 in the request: to the end of the context).
    params: SamplingParams
    stops: tuple[str, ...]


def prepare(model: TextModel, request: custos_pb2.GenerateRequest, limits: PromptLimits) -> Prompt:
    """Check and tokenize the request (blocking: the tokenizer runs here); ``InvalidInputError`` if bad."""
    stops = _stops(request)
    sampling = _sampling(request)
    # A prompt longer than this cannot fit the context: refused on its size, before the tokenizer
    # spends time on it (refused work is free, so it must be cheap).
    limits = replace(
        limits, max_prompt_bytes=min(limits.max_prompt_bytes, model.context_length * model.max_token_bytes)
    )
    kind = request.WhichOneof("input")
    if kind == "chat":
        messages = _messages(request.chat, limits)
        try:
            tokens = model.encode_chat(messages)
        except ValueError as exc:
            raise InvalidInputError(f"the chat does not fit the model's template: {exc}") from None
    elif kind == "prompt":
        if len(request.prompt) > limits.max_prompt_bytes:
            raise InvalidInputError(
                f"prompt is over {limits.max_prompt_bytes} bytes, more than the model's context can hold"
            )
        text = _utf8(request.prompt, "prompt")
        if not text:
            raise InvalidInputError("prompt is empty")
        tokens = model.encode_prompt(text)
    else:
        raise InvalidInputError("request carries no prompt and no messages")
    context = model.context_length
    if not tokens:
        raise InvalidInputError("prompt is empty")
    if len(tokens) >= context:
        raise InvalidInputError(
            f"prompt is {len(tokens)} tokens, the model's context {context}: leave room for one token"
        )
    room = context - len(tokens)
    if request.max_tokens > room:
        raise InvalidInputError(
            f"max_tokens must be 1 to {room} (the context of {context} less the prompt's "
            f"{len(tokens)} tokens), got {request.max_tokens}"
        )
    return Prompt(tokens, replace(sampling, max_tokens=request.max_tokens or room), stops)


def _messages(chat: custos_pb2.ChatMessages, limits: PromptLimits) -> list[ChatMessage]:
    if not chat.messages:
        raise InvalidInputError("the chat has no messages")
    if len(chat.messages) > limits.max_messages:
        raise InvalidInputError(f"the chat has {len(chat.messages)} messages, over {limits.max_messages}")
    if sum(len(m.content) for m in chat.messages) > limits.max_prompt_bytes:
        raise InvalidInputError(
            f"the messages are over {limits.max_prompt_bytes} bytes, more than the model's context can hold"
        )
    messages = []
    for number, message in enumerate(chat.messages, start=1):
        if message.role not in ROLES:
            raise InvalidInputError(
                f"message {number} has unknown role {message.role!r} (one of {', '.join(ROLES)})"
            )
        messages.append(ChatMessage(message.role, _utf8(message.content, f"message {number}'s content")))
    if not any(m.content for m in messages):
        raise InvalidInputError("prompt is empty: every message is empty")
    return messages


def _sampling(request: custos_pb2.GenerateRequest) -> SamplingParams:
    """The sampling parameters; ``max_tokens`` is set once the prompt's length is known."""
    temperature = request.temperature if request.HasField("temperature") else 1.0
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        raise InvalidInputError(f"temperature must be 0 to {MAX_TEMPERATURE:g}, got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidInputError(f"top_p must be above 0 and at most 1, got {top_p}")
    if request.top_k > MAX_TOP_K:
        raise InvalidInputError(f"top_k must be 0 (no limit) to {MAX_TOP_K}, got {request.top_k}")
    return SamplingParams(
        max_tokens=0,
        temperature=temperature,
        top_p=top_p,
        top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None,
    )


def _stops(request: custos_pb2.GenerateRequest) -> tuple[str, ...]:
    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidInputError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(request.stop)}")
    stops = []
    for stop in request.stop:
        if not 0 < len(stop) <= MAX_STOP_BYTES:
            raise InvalidInputError(f"a stop string must be 1 to {MAX_STOP_BYTES} bytes")
        stops.append(_utf8(stop, "a stop string"))
    return tuple(stops)


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{what} is not valid UTF-8 (byte {exc.start})") from None
