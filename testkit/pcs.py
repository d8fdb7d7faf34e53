"""A local stand-in for Intel's PCS v4 API: a threaded HTTP server on 127.0.0.1, port 0.

It answers the paths :mod:`enclave.collateral.intel_pcs` asks for with the
documents a test gives it (the real recorded ones from ``../shared/vectors``,
or synthetic ones), the issuer chains URL-encoded in the headers PCS uses, and
404 for anything else. ``down`` makes every request fail with 503, the way an
unreachable service looks to a client that retries.
"""

from __future__ import annotations

import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class _Answer:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class PcsDouble:
    def __init__(self) -> None:
        self.answers: dict[str, _Answer] = {}
        self.requests: list[str] = []
        self.down = False
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def tcb_info(self, tee: str, fmspc: str, body: bytes, chain: bytes) -> None:
        self._set(f"/{tee}/certification/v4/tcb?fmspc={fmspc.upper()}", body, "TCB-Info-Issuer-Chain", chain)

    def qe_identity(self, tee: str, body: bytes, chain: bytes) -> None:
        self._set(f"/{tee}/certification/v4/qe/identity", body, "SGX-Enclave-Identity-Issuer-Chain", chain)

    def pck_crl(self, ca: str, der: bytes, chain: bytes) -> None:
        self._set(
            f"/sgx/certification/v4/pckcrl?ca={ca}&encoding=der", der, "SGX-PCK-CRL-Issuer-Chain", chain
        )

    def root_ca_crl(self, der: bytes) -> None:
        self._set("/sgx/certification/v4/rootcacrl", der, None, None)

    def _set(self, path: str, body: bytes, header: str | None, chain: bytes | None) -> None:
        headers = {header: urllib.parse.quote(chain)} if header and chain is not None else {}
        with self._lock:
            self.answers[path] = _Answer(body, headers)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        double = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with double._lock:
                    double.requests.append(self.path)
                    answer = None if double.down else double.answers.get(self.path)
                    down = double.down
                status = 503 if down else 200 if answer is not None else 404
                body = answer.body if answer is not None else b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (answer.headers if answer is not None else {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def pcs_double() -> Iterator[PcsDouble]:
    double = PcsDouble()
    double.start()
    try:
        yield double
    finally:
        double.stop()
