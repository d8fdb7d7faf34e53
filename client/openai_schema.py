"""OpenAI's chat completions API, as far as custos-proxy speaks it: requests in, responses out.

Requests are parsed into ``ChatRequest`` (the arguments of ``Connection.generate``)
or refused with ``InvalidInputError`` naming the field; responses, stream chunks
and errors have OpenAI's shapes, so its clients work unchanged. A finish reason
of ``quota`` (the deployment's tokens ran out mid-answer) is ``length`` to an
OpenAI client, and ``custos_finish_reason`` says which.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from client.errors import InvalidInputError
from client.generation import Usage

MAX_BODY_BYTES = 2 << 20
# OpenAI's "developer" role is the system role of models that have no other.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields that would change what the answer means; refused rather than silently ignored.
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "response_format", "audio")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_chat_request(body: bytes) -> ChatRequest:
    if len(body) > MAX_BODY_BYTES:
        raise InvalidInputError(f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError("the request body is not JSON (UTF-8)") from None
    except RecursionError:
        raise InvalidInputError("the request body nests too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidInputError("the request body must be a JSON object")
    for name in _UNSUPPORTED:
        if doc.get(name) not in (None, [], {}):
            raise InvalidInputError(f"{name} is not supported by this model")
    if doc.get("n", 1) != 1:
        raise InvalidInputError("n must be 1")
    if doc.get("logprobs"):
        raise InvalidInputError("logprobs are not supported")
    model = doc.get("model", "")
    if not isinstance(model, str):
        raise InvalidInputError("model must be a string")
    stream = _optional(doc, "stream", bool) or False
    options = doc.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise InvalidInputError("stream_options is an object, and only for stream: true")
    max_tokens = _optional(doc, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _optional(doc, "max_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidInputError("max_tokens must be at least 1")
    temperature, top_p = _optional(doc, "temperature", float), _optional(doc, "top_p", float)
    if top_p is not None and top_p == 0:
        raise InvalidInputError("top_p must be above 0")
    stop = doc.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidInputError("stop must be a string or a list of strings")
    return ChatRequest(
        model=model,
        messages=_messages(doc.get("messages")),
        max_tokens=max_tokens or 0,
        temperature=temperature,
        top_p=top_p,
        top_k=_optional(doc, "top_k", int) or 0,
        seed=_optional(doc, "seed", int),
        stop=stops,
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
    )


def _messages(value: object) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InvalidInputError("messages must be a non-empty list")
    messages = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise InvalidInputError(f"message {number} is not an object")
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidInputError(f"message {number} has unknown role {role!r} (system, user, assistant)")
        messages.append({"role": _ROLES[role], "content": _content(message.get("content"), number)})
    return messages


def _content(value: object, number: int) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(value) and all(isinstance(t, str) for t in texts):
            return "".join(t for t in texts if isinstance(t, str))
    raise InvalidInputError(f"message {number}'s content must be text (a string or text parts)")


def _optional(doc: dict[str, Any], name: str, kind: type[Any]) -> Any:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) != (kind is bool) or not isinstance(
        value, int | float if kind is float else kind
    ):
        raise InvalidInputError(f"{name} must be {'a number' if kind is float else kind.__name__}")
    return float(value) if kind is float else value


# ------------------------------------------------------------------ responses


class Completion:
    """The ids and names one answer's response or chunks share."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def response(self, text: str, usage: Usage) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    **_finish(usage),
                }
            ],
            "usage": usage_doc(usage),
        }

    def chunk(
        self, delta: dict[str, str], *, usage: Usage | None = None, include_usage: bool = False
    ) -> dict[str, Any]:
        """A stream chunk; with ``usage`` (the last one) its finish reason."""
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        if usage is not None:
            choice.update(_finish(usage))
        doc = self._chunk([choice])
        if include_usage:
            doc["usage"] = None
        return doc

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
        doc = self._chunk([])
        doc["usage"] = usage_doc(usage)
        return doc

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


def _finish(usage: Usage) -> dict[str, str]:
    reason = "length" if usage.finish_reason == "quota" else usage.finish_reason
    return {"finish_reason": reason, "custos_finish_reason": usage.finish_reason}


def usage_doc(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def error_doc(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(doc: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: JSON`` (or ``data: [DONE]``), then a blank line."""
    data = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
