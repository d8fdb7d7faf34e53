"""A real PostgreSQL server: initdb and pg_ctl in a temporary directory, on a loopback port.

The integration tests (``tests/postgres_support``) and the benchmarks start
their clusters with it. The superuser has a password, so every URL carries
one (what the custodian must never print). ``new_database`` makes a fresh,
empty database per test or benchmark round.

PostgreSQL refuses to run as root: when we are root, the cluster's directory
belongs to the ``postgres`` user (Debian's package creates it), else
``nobody``, and initdb and pg_ctl run as that user. ``CUSTOS_PG_BIN`` names
the directory of initdb and pg_ctl if they are not under
``/usr/lib/postgresql/*/bin`` or on the PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

BIN_ENV = "CUSTOS_PG_BIN"
START_TIMEOUT_S = 60
SUPERUSER = "custos"


def bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl, if PostgreSQL is installed."""
    candidates = [os.environ.get(BIN_ENV, "")]
    candidates += sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)
    on_path = shutil.which("pg_ctl")
    candidates.append(str(Path(on_path).parent) if on_path else "")
    for candidate in filter(None, candidates):
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run_as() -> str | None:
    """The user PostgreSQL runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError(
        "running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL"
    )


@dataclass
class Postgres:
    """A running cluster; ``url()`` for the ``postgres`` database, ``new_database()`` for a fresh one."""

    bin_dir: Path
    directory: Path
    port: int
    password: str
    user: str | None
    _names: itertools.count[int] = field(default_factory=itertools.count)
    _options: str = ""

    @classmethod
    def start(cls, *, durable: bool = False) -> Postgres:
        """A new cluster, running; ``durable``: with fsync (benchmarks), else without (tests)."""
        binaries = bin_dir()
        if binaries is None:
            raise RuntimeError("no PostgreSQL: apt-get install postgresql (or set CUSTOS_PG_BIN)")
        user = _run_as()
        directory = Path(tempfile.mkdtemp(prefix="custos-pg-"))
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        directory.chmod(0o700)
        cluster = cls(binaries, directory, _free_port(), secrets.token_hex(16), user)
        pwfile = directory / "pw"
        pwfile.write_text(cluster.password)
        if user is not None:
            os.chown(pwfile, pwd.getpwnam(user).pw_uid, -1)
        cluster._pg(
            "initdb",
            "-D",
            str(directory / "data"),
            "-U",
            SUPERUSER,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
        )
        pwfile.unlink()
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={cluster.port} -c unix_socket_directories={directory}"
        )
        if not durable:  # tests only: nothing here must survive the machine
            options += " -c fsync=off -c full_page_writes=off"
        cluster._options = options
        cluster.start_server()
        return cluster

    def _pg(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.bin_dir / tool), *args],
            user=self.user,
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}")

    def start_server(self) -> None:
        self._pg(
            "pg_ctl",
            "-D",
            str(self.directory / "data"),
            "-l",
            str(self.directory / "log"),
            "-o",
            self._options,
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "start",
        )

    def stop_server(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.directory / "data"), "-m", mode, "-w", "stop")

    def close(self) -> None:
        try:
            self.stop_server("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, database: str = "postgres", *, port: int | None = None) -> str:
        """The URL of ``database``; ``port``: through a proxy (``TcpProxy``) on that port."""
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{port or self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t{next(self._names)}"

        async def create() -> None:
            conn = await asyncpg.connect(self.url())
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return self.url(name)


class TcpProxy:
    """A loopback TCP forwarder to the cluster: cutting it cuts one client off the database."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                if self._cut:
                    client.close()
                    continue
                upstream = socket.create_connection(self._target)
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection through it, and refuse new ones (as a network partition would)."""
        with self._lock:
            self._cut = True
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._open.clear()

    def close(self) -> None:
        self.cut()
        self._server.close()
