"""custos-proxy's refusal of web pages: only programs on this machine may spend the quota.

A page in the user's browser can send a request to ``127.0.0.1:8000`` (a form or
a ``no-cors`` fetch needs no preflight), and through DNS rebinding it can read
the answer under a name of its own. Programs (the ``openai`` package, curl) send
neither an ``Origin`` header nor another host's name, and send their body as JSON.
So a request is refused when it carries ``Origin``, when its ``Host`` is not a
name of the address listened on, or when a ``POST`` body is not
``application/json`` (which a page cannot send without a preflight).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from client.openai_schema import error_doc

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class BrowserGuard:
    """ASGI middleware in front of the proxy's application; ``listen_host`` is what it is bound to."""

    def __init__(self, app: ASGIApp, *, listen_host: str) -> None:
        self._app = app
        # A wildcard bind answers to any name (the operator was warned it is not loopback).
        self._any_host = _is_wildcard(listen_host)
        self._hosts = LOOPBACK_NAMES | {listen_host.strip("[]").lower()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope["method"], _headers(scope["headers"]))
            if refusal is not None:
                status, message, code = refusal
                await _answer(send, status, error_doc(message, "invalid_request_error", code))
                return
        await self._app(scope, receive, send)

    def _refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        if "origin" in headers:
            return 403, "requests from web pages are refused: this proxy spends your quota", "origin_refused"
        if not self._any_host and _host_name(headers.get("host", "")) not in self._hosts:
            return 403, "the Host header does not name this proxy's address", "host_refused"
        if method == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return 415, "the request body must be sent as application/json", "content_type_refused"
        return None


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}


def _host_name(host: str) -> str:
    """``Host``'s name without its port: ``[::1]:8000`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


async def _answer(send: Send, status: int, doc: dict[str, object]) -> None:
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
