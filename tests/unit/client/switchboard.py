"""A loopback TCP relay that decides, connection by connection, where the client's bytes go.

It stands for what can change between the client's first handshake and its
pinned channel: an enclave that stopped and closed its port, one that enrolled
again under a new key, or a network attacker answering in its place.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class Switchboard:
    """Relays the n-th new connection to ``routes[n]`` (HOST:PORT), the last route for every later one.

    A route of ``None`` closes the listener: that connection and every later one are refused.
    """

    def __init__(self, *routes: str | None) -> None:
        self.routes = list(routes)
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def cut(self) -> None:
        """Close every relayed connection, as a restart of the far end would."""
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.cut()
        self._accepting.join(timeout=10)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            route = self.routes[min(self.connections, len(self.routes) - 1)]
            self.connections += 1
            if route is None:
                # Stop listening before the client can notice: any later connection is refused.
                self._listener.close()
                client.close()
                return
            host, port = route.rsplit(":", 1)
            try:
                upstream = socket.create_connection((host, int(port)), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@contextmanager
def switchboard(*routes: str | None) -> Iterator[Switchboard]:
    board = Switchboard(*routes)
    try:
        yield board
    finally:
        board.close()
