"""The web console's listener: uvicorn serving the console app on the custodian's own event loop.

uvicorn's ``Server.serve`` would take over SIGINT and SIGTERM (the custodian
handles those itself), so it runs here with that step left out, as a task
serving a socket bound beforehand (a port in use is said at once). Its access
log is off: a login URL's path is a secret. Beside it a ticker snapshots the
refusal counters each minute (``custodian.web.refusal_counts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import uvicorn

from custodian.config import Address
from custodian.errors import ConfigError
from custodian.web.app import build, new_base
from custodian.web.login_socket import LoginSocket
from custodian.web.refusal_counts import STEP, RefusalCounts
from custodian.web.sessions import Sessions
from custodian.web.views import ConsoleServices

logger = logging.getLogger(__name__)

_STARTUP_SECONDS = 10.0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: stopped by ``ConsoleListener.stop``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ConsoleListener:
    def __init__(self) -> None:
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._login: LoginSocket | None = None
        self.address: Address | None = None

    @classmethod
    async def start(
        cls,
        services: ConsoleServices,
        address: Address,
        login_socket: Path,
        *,
        now: Callable[[], datetime],
    ) -> ConsoleListener:
        listener = cls()
        try:
            await listener._start(services, address, login_socket, now)
        except BaseException:
            await listener.stop()
            raise
        return listener

    async def _start(
        self, services: ConsoleServices, address: Address, login_socket: Path, now: Callable[[], datetime]
    ) -> None:
        try:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            self._socket = socket.create_server((address.host, address.port), family=family)
        except OSError as exc:
            raise ConfigError(f"cannot serve the web console on {address}: {exc.strerror}") from exc
        self.address = Address(address.host, self._socket.getsockname()[1])
        if not _loopback(address.host):
            logger.warning(
                "the web console serves plain HTTP on %s, beyond loopback: put it behind TLS", self.address
            )
        # A wildcard address is no place to send a browser: login URLs name this host instead.
        shown = socket.gethostname() if address.host in ("0.0.0.0", "::", "") else address.host  # noqa: S104
        origin = f"http://{Address(shown, self.address.port)}"
        base = new_base()
        sessions = Sessions(now=now)
        app = build(services, sessions, origin=origin, base=base, secure=False)
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=1,
        )
        server = self._server = _EmbeddedServer(config)
        self._loop_task = asyncio.create_task(server.serve(sockets=[self._socket]))
        async with asyncio.timeout(_STARTUP_SECONDS):
            while not server.started:
                if self._loop_task.done():
                    raise ConfigError(f"the web console on {address} did not start")
                await asyncio.sleep(0.01)
        self._login = LoginSocket(
            login_socket, lambda user: f"{origin}{base}/login/{sessions.new_login_link(user)}"
        )
        await self._login.start()
        self._ticker = asyncio.create_task(_tick(services.refusals))

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await self._stop_serving()

    async def _stop_serving(self) -> None:
        if self._login is not None:
            await self._login.stop()
            self._login = None
        if self._server is not None:
            self._server.should_exit = True
            if self._loop_task is not None:
                with contextlib.suppress(asyncio.CancelledError, SystemExit):
                    await self._loop_task
                self._loop_task = None
            self._server = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def _tick(refusals: RefusalCounts) -> None:
    """Snapshot the refusal counters each step, so that the last hour's count is ready when asked."""
    while True:
        await asyncio.sleep(STEP.total_seconds())
        refusals.sample()
