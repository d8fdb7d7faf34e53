"""The web console's login, sessions and headers over real HTTP, against an in-process custodian whose
clock the test sets (so that five minutes and half an hour pass at once)."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from custodian.config import Address, CustodianConfig
from custodian.errors import ConfigError, ConsoleError
from custodian.server import CustodianServer
from custodian.web.guard import CSP
from custodian.web.login_socket import request_login_url
from tests.unit.custodian.harness import Clock

pytestmark = pytest.mark.integration


@asynccontextmanager
async def _serving(tmp_path: Path, clock: Clock, console: Address | None) -> AsyncIterator[CustodianServer]:
    config = CustodianConfig(
        data_dir=tmp_path / "data", listen=Address("127.0.0.1", 0), console_listen=console
    )
    server = await CustodianServer.start(config, now=clock)
    try:
        yield server
    finally:
        await server.stop(grace=0)


def _socket(server: CustodianServer) -> Path:
    assert server.endpoints is not None
    return server.endpoints.admin_socket.parent / "console.sock"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _get(url: str, cookie: str = "") -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


async def _login(server: CustodianServer) -> tuple[str, str]:
    """A login URL from the console socket, spent: (the URL, the session cookie)."""
    url = await asyncio.to_thread(request_login_url, _socket(server), "tester@here")
    status, headers, _ = await asyncio.to_thread(_get, url)
    assert status == 303
    cookie = headers["set-cookie"]
    base = url.split("/login/")[0]
    assert headers["location"] == urlsplit(base).path + "/"
    for attribute in ("HttpOnly", "SameSite=strict", f"Path={urlsplit(base).path}/;", "Max-Age="):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would never come back
    return url, cookie.split(";")[0]


def test_sessions_expire_and_login_urls_are_single_use_and_short_lived(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with _serving(tmp_path, clock, Address("127.0.0.1", 0)) as server:
            url, cookie = await _login(server)
            base = url.split("/login/")[0]
            status, headers, _ = await asyncio.to_thread(_get, base + "/", cookie)
            assert status == 200
            assert headers["content-security-policy"] == CSP
            assert (await asyncio.to_thread(_get, url))[0] == 403  # used once already

            clock.advance(29 * 60)  # idle, not yet expired; the request restarts the idle timer
            assert (await asyncio.to_thread(_get, base + "/", cookie))[0] == 200
            clock.advance(31 * 60)
            status, headers, body = await asyncio.to_thread(_get, base + "/?format=json", cookie)
            assert status == 401
            assert "custodian console login" in json.loads(body)["error"]
            assert headers["content-security-policy"] == CSP

            stale = await asyncio.to_thread(request_login_url, _socket(server), "t")
            clock.advance(5 * 60 + 1)
            assert (await asyncio.to_thread(_get, stale))[0] == 403

            _, cookie = await _login(server)  # a session in use still ends 12 hours after login
            for _ in range(25):
                clock.advance(29 * 60)
                await asyncio.to_thread(_get, base + "/", cookie)
            assert (await asyncio.to_thread(_get, base + "/", cookie))[0] == 401

    asyncio.run(scenario())


def test_the_console_is_off_by_default_and_a_busy_port_is_said(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _serving(tmp_path / "off", Clock(), None) as server:
            assert server.endpoints is not None
            assert server.endpoints.console is None
            assert not (_socket(server)).exists()
            with pytest.raises(ConsoleError, match="no web console is serving"):
                request_login_url(_socket(server), "t")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(ConfigError, match=f"cannot serve the web console on 127.0.0.1:{port}"):
                async with _serving(tmp_path / "busy", Clock(), Address("127.0.0.1", port)):
                    pass

    asyncio.run(scenario())


def test_the_login_socket_answers_a_malformed_request_with_an_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _serving(tmp_path, Clock(), Address("127.0.0.1", 0)) as server:
            path = _socket(server)
            assert path.stat().st_mode & 0o777 == 0o600

            def ask(line: bytes) -> bytes:
                with socket.socket(socket.AF_UNIX) as conn:
                    conn.connect(str(path))
                    conn.sendall(line)
                    return conn.makefile("rb").readline()

            for line in (b"not json\n", b'{"user": 5}\n', b"[]\n", b"x" * 5000 + b"\n"):
                assert "error" in json.loads(await asyncio.to_thread(ask, line))

    asyncio.run(scenario())


def test_beyond_loopback_is_warned_and_login_urls_name_the_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with _serving(tmp_path, Clock(), Address("0.0.0.0", 0)) as server:
            url = await asyncio.to_thread(request_login_url, _socket(server), "t")
            assert url.startswith(f"http://{socket.gethostname()}:")
        assert "plain HTTP on 0.0.0.0:" in caplog.text

    asyncio.run(scenario())
