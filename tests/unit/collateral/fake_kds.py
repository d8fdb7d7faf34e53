"""A local AMD KDS for the tests: a threaded HTTP server on 127.0.0.1:0 serving recorded documents.

It answers exactly the paths (with their query strings) it was given and 404
for anything else, as KDS does for a chip or TCB it does not know; ``down()``
closes its socket, so a client sees a refused connection.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from enclave.attestation.sev_snp_report import parse_report

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors" / "sev-snp"
# gosev_attestation.bin: a version 2 Milan report, CHIP_ID below, REPORTED_TCB bl=2 tee=0 snp=5 ucode=68;
# gosev_vcek.testcer.der is its VCEK as KDS served it (../shared/vectors/MANIFEST.md).
GOSEV_REPORT = VECTORS / "gosev_attestation.bin"
GOSEV_VCEK = VECTORS / "gosev_vcek.testcer.der"
GOSEV_CHAIN = VECTORS / "gosev_milan_ask_ark.pem"
GOSEV_CHIP_ID = GOSEV_REPORT.read_bytes()[0x1A0:0x1E0]
GOSEV_VCEK_PATH = f"/vcek/v1/Milan/{GOSEV_CHIP_ID.hex()}?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68"
# The names AmdKds caches them under: product, hwid and the raw REPORTED_TCB.
GOSEV_VCEK_NAME = (
    f"amd-vcek-Milan-{GOSEV_CHIP_ID.hex()}-{parse_report(GOSEV_REPORT.read_bytes()).reported_tcb:016x}.der"
)
GOSEV_CHAIN_NAME = "amd-cert-chain-Milan-vcek.pem"


class FakeKds:
    def __init__(self, documents: dict[str, bytes] | None = None) -> None:
        self.documents: dict[str, bytes] = dict(documents or {})
        self.requests: list[str] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self.url = ""

    @classmethod
    def recorded(cls) -> FakeKds:
        """The real Milan VCEK of gosev_attestation.bin and the real Milan ASK/ARK chain."""
        return cls(
            {
                GOSEV_VCEK_PATH: GOSEV_VCEK.read_bytes(),
                "/vcek/v1/Milan/cert_chain": GOSEV_CHAIN.read_bytes(),
            }
        )

    def up(self) -> None:
        kds = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                kds.requests.append(self.path)
                body = kds.documents.get(self.path)
                self.send_response(200 if body is not None else 404)
                body = body if body is not None else b"Not Found"
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        """Stop answering: the port is closed, the URL stays (connections are refused)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@contextmanager
def serving(kds: FakeKds) -> Iterator[FakeKds]:
    kds.up()
    try:
        yield kds
    finally:
        kds.down()
