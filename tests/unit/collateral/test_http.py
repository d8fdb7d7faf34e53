"""The collateral services' HTTP fetcher, against a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from enclave.collateral._http import CollateralServiceError, check_base_url, get, join


class _Handler(http.server.BaseHTTPRequestHandler):
    script: ClassVar[list[tuple[int, bytes]]] = []
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        status, body = self.script.pop(0) if self.script else (404, b"")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("TCB-Info-Issuer-Chain", "a%20b")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.script = []
    _Handler.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _no_sleep(_: float) -> None:
    pass


def test_a_body_and_its_headers_come_back(server: str) -> None:
    _Handler.script = [(200, b"hello")]
    reply = get(join(server, "/x", {"fmspc": "00906ED50000"}), sleep=_no_sleep)
    assert reply.body == b"hello"
    assert reply.header("TCB-Info-Issuer-Chain") == "a%20b"
    assert _Handler.seen == ["/x?fmspc=00906ED50000"]


def test_server_errors_are_retried_then_succeed(server: str) -> None:
    _Handler.script = [(503, b""), (500, b""), (200, b"ok")]
    assert get(server + "/x", attempts=3, sleep=_no_sleep).body == b"ok"
    assert len(_Handler.seen) == 3


def test_not_found_is_final_and_names_the_url(server: str) -> None:
    _Handler.script = [(404, b"")]
    with pytest.raises(CollateralServiceError, match=r"/missing: HTTP 404") as caught:
        get(server + "/missing", attempts=3, sleep=_no_sleep)
    assert caught.value.status == 404
    assert len(_Handler.seen) == 1


def test_an_oversized_answer_is_refused(server: str) -> None:
    _Handler.script = [(200, b"x" * 101)]
    with pytest.raises(CollateralServiceError, match="exceeds 100 bytes"):
        get(server + "/big", max_bytes=100, sleep=_no_sleep)


def test_an_unreachable_service_is_named_after_every_attempt() -> None:
    delays: list[float] = []
    with pytest.raises(CollateralServiceError, match=r"127\.0\.0\.1:9/x: not reachable") as caught:
        get("http://127.0.0.1:9/x", attempts=3, timeout=2, sleep=delays.append)
    assert caught.value.status is None
    assert len(delays) == 2
    assert delays[0] < delays[1] * 2


@pytest.mark.parametrize(
    "base",
    ["ftp://host/x", "file:///etc/passwd", "https://", "http://host/x?y=1", "not a url"],
    ids=["ftp", "file", "no-host", "query", "garbage"],
)
def test_only_http_urls_with_a_host_are_service_bases(base: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        check_base_url(base)


def test_a_base_url_loses_its_trailing_slash() -> None:
    assert check_base_url("https://api.trustedservices.intel.com/") == "https://api.trustedservices.intel.com"
    assert join("http://h:1/p/", "/sgx/x") == "http://h:1/p/sgx/x"
