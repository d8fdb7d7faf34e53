"""``DATA/console.sock``: where ``custodian console login`` asks for a one-time login link.

The socket is 0600, like ``admin.sock``: whoever can reach it may administer the
custodian anyway. The exchange is one JSON line each way: the console says who
it is (``{"user": "alice@host"}``, recorded as claimed, as the CLI's origin is)
and gets ``{"url": ...}`` back, or ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable
from pathlib import Path

from custodian.errors import ConsoleError

MAX_REQUEST_BYTES = 1024
_MAX_CLAIM = 64
_TIMEOUT = 5.0


def clean_claim(text: str) -> str:
    """What of a claimed user name the audit log repeats: printable, no spaces, bounded."""
    return "".join(c for c in text[:_MAX_CLAIM] if c.isprintable() and not c.isspace()) or "?"


class LoginSocket:
    """Answers each connection with a fresh login URL from ``mint(user)``."""

    def __init__(self, path: Path, mint: Callable[[str], str]) -> None:
        self._path = path
        self._mint = mint
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._answer, path=str(self._path))
        self._path.chmod(0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._path.unlink(missing_ok=True)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_TIMEOUT):
                line = await reader.readline()
            if len(line) > MAX_REQUEST_BYTES:
                answer = {"error": "request too long"}
            else:
                try:
                    user = json.loads(line).get("user", "")
                except (ValueError, AttributeError):
                    user = None
                if isinstance(user, str):
                    answer = {"url": self._mint(f"{clean_claim(user)} (claimed)")}
                else:
                    answer = {"error": 'the request is one JSON line {"user": NAME}'}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def request_login_url(path: Path, user: str) -> str:
    """Ask the custodian serving ``path``'s data directory for a login URL (blocking, for the CLI)."""
    if not path.exists():
        raise ConsoleError(
            f"no web console is serving {path.parent}: start the custodian with `custodian serve --console"
            " HOST:PORT`"
        )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(_TIMEOUT)
            conn.connect(str(path))
            conn.sendall(json.dumps({"user": user}).encode() + b"\n")
            reply = conn.makefile("rb").readline(MAX_REQUEST_BYTES * 4)
    except OSError as exc:
        raise ConsoleError(f"the web console at unix:{path} is not answering: {exc}") from None
    try:
        answer = json.loads(reply)
    except ValueError:
        raise ConsoleError(f"the web console at unix:{path} sent no answer") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("url"), str):
        raise ConsoleError(
            f"the web console refused: {answer.get('error') if isinstance(answer, dict) else '?'}"
        )
    return str(answer["url"])
