"""custos-proxy as a real process, in front of a real enclave daemon serving the echo TEST DOUBLE
(tests/llm_double.py) over attested TLS; driven by OpenAI's own Python package and by raw HTTP."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from enclave.llm.interface import ChatMessage
from testkit.processes import free_port, isolated_env, poll, script, spawn, stop
from tests.llm_double import EchoModel
from tests.llm_enclave import serving_llm
from tests.unit.enclave.fake_custodian import CertAuthority


@contextlib.contextmanager
def proxy(tmp_path: Path, enclave: str, manifest: Path, port: int | None = None) -> Iterator[int]:
    port = port or free_port()
    log = tmp_path / f"proxy-{port}.log"
    proc = spawn(
        [
            script("custos-proxy"),
            "--enclave",
            enclave,
            "--manifest",
            str(manifest),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        isolated_env(tmp_path),
        log,
    )
    try:
        poll(lambda: "serving http" in log.read_text() or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        yield port
    finally:
        stop(proc)


def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)


def post(
    port: int, body: bytes | dict[str, object], headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        sent = {"Content-Type": "application/json", **(headers or {})}
        connection.request("POST", "/v1/chat/completions", data, sent)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


def test_the_openai_package_works_unchanged_with_and_without_stream(tmp_path: Path) -> None:
    with serving_llm(tmp_path) as served, proxy(tmp_path, served.address, served.manifest_file) as port:
        openai_client = client(port)
        [model] = openai_client.models.list().data
        assert model.id == served.gateway.deployment

        reply = openai_client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "hi there"}], max_tokens=7
        )
        assert reply.choices[0].message.content == "[user]h"
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None
        prompt_tokens = len("[user]hi there\n") + 1
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 7)

        stream = openai_client.chat.completions.create(
            model=model.id,
            messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "yé"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "[system]x\n[user]yé\n"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == len(text.encode())
        assert all(c.usage is None for c in chunks[:-1])
        # Both answers charged, prompt and completion: the echo's prompt is BOS and the answer's bytes.
        answer_tokens = len(text.encode())
        assert served.daemon.lease.committed == (prompt_tokens + 7) + (answer_tokens + 1 + answer_tokens)


def test_raw_http_gets_server_sent_events_and_openai_shaped_errors(tmp_path: Path) -> None:
    with serving_llm(tmp_path) as served, proxy(tmp_path, served.address, served.manifest_file) as port:
        status, kind, body = post(
            port, {"model": "m", "stream": True, "messages": [{"role": "user", "content": "ab"}]}
        )
        assert (status, kind.split(";")[0]) == (200, "text/event-stream")
        events = body.decode().split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        assert all(event.startswith("data: ") for event in events[:-1])
        docs = [json.loads(event[6:]) for event in events[:-2]]
        assert "".join(d["choices"][0]["delta"].get("content", "") for d in docs) == "[user]ab\n"

        committed = served.daemon.lease.committed
        bad = [
            b"{not json",
            b"\xff\xfe",
            {"model": "m", "messages": []},
            {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            {"model": "m", "messages": [{"role": "user", "content": "x" * 100}]},
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 7},
        ]
        for request in bad:
            status, kind, body = post(port, request)
            assert status == 400, (request, body)
            error = json.loads(body)["error"]
            assert error["type"] == "invalid_request_error"
            assert error["message"]
        assert served.daemon.lease.committed == committed  # refused input costs nothing


def test_what_a_web_page_could_send_is_refused_and_costs_nothing(tmp_path: Path) -> None:
    # A page in the user's browser can POST to 127.0.0.1 without a preflight (text/plain, no-cors), and
    # read answers through DNS rebinding (a foreign Host): found in review. Programs send none of these.
    with serving_llm(tmp_path) as served, proxy(tmp_path, served.address, served.manifest_file) as port:
        committed = served.daemon.lease.committed
        chat = {"model": "m", "messages": [{"role": "user", "content": "ab"}]}
        for headers, status, code in [
            ({"Origin": "https://evil.example"}, 403, "origin_refused"),
            ({"Origin": "null"}, 403, "origin_refused"),
            ({"Host": f"rebind.evil.example:{port}"}, 403, "host_refused"),
            ({"Content-Type": "text/plain"}, 415, "content_type_refused"),
        ]:
            answered, _, body = post(port, chat, headers)
            assert (answered, json.loads(body)["error"]["code"]) == (status, code), headers
        deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        answered, _, body = post(port, deep)
        assert answered == 400, body
        assert served.daemon.lease.committed == committed
        assert post(port, chat, {"Host": f"localhost:{port}"})[0] == 200  # a name of the loopback address


def test_quota_exhausted_is_429_insufficient_quota(tmp_path: Path) -> None:
    with (
        serving_llm(tmp_path, balance=20, lease_size=20) as served,
        proxy(tmp_path, served.address, served.manifest_file) as port,
    ):
        openai_client = client(port)
        reply = openai_client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "abcdef"}], max_tokens=20
        )
        assert reply.choices[0].finish_reason == "length"  # cut short by the quota
        raw = reply.choices[0].model_dump()
        assert raw["custos_finish_reason"] == "quota"
        with pytest.raises(openai.RateLimitError) as refused:
            openai_client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
        assert refused.value.status_code == 429
        assert refused.value.code == "insufficient_quota"


def test_verification_refused_at_start_exits_3_and_listens_nowhere(tmp_path: Path) -> None:
    with serving_llm(tmp_path) as served, serving_llm(tmp_path / "other") as other:
        port = free_port()
        done = subprocess.run(
            [script("custos-proxy"), "--enclave", served.address, "--manifest", str(other.manifest_file),
             "--listen", f"127.0.0.1:{port}"],
            env=isolated_env(tmp_path), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 3, done.stderr
        assert "verification refused, nothing was sent" in done.stderr


def test_a_new_enclave_at_the_address_is_verified_again_503_when_it_fails(tmp_path: Path) -> None:
    ca = CertAuthority("shared test custodian CA")
    with contextlib.ExitStack() as proxies:
        with serving_llm(tmp_path / "a", custodian_ca=ca) as first:
            address = first.address
            listen = f"127.0.0.1:{address.rsplit(':', 1)[1]}"
            port = proxies.enter_context(proxy(tmp_path, address, first.manifest_file))
            assert _ask(port)[0] == 200
        # Another enclave at the same address, pinning another custodian CA than the manifest's.
        with serving_llm(tmp_path / "b", listen=listen) as wrong:
            status, body = _ask(port)
            assert status == 503
            error = json.loads(body)["error"]
            assert error["code"] == "verification_refused"
            assert "verification refused, nothing was sent" in error["message"]
            assert "custodian" in error["message"].lower()
            assert wrong.daemon.lease.committed == 0
        # The same build, CA and model again (a restarted enclave, with a new key): verified, served.
        with serving_llm(tmp_path / "c", custodian_ca=ca, listen=listen) as again:
            assert _ask(port)[0] == 200
            assert again.daemon.lease.committed > 0


def _ask(port: int) -> tuple[int, bytes]:
    status, _, body = post(
        port, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    )
    return status, body


def test_an_enclave_not_there_yet_is_503_with_the_reason_until_it_is(tmp_path: Path) -> None:
    with serving_llm(tmp_path / "ref") as reference:
        manifest = reference.manifest_file
    with proxy(tmp_path, f"127.0.0.1:{free_port()}", manifest) as port:
        status, body = _ask(port)
        assert status == 503
        assert "nothing is listening" in json.loads(body)["error"]["message"]
        with pytest.raises(openai.APIStatusError) as refused:
            client(port).models.list()
        assert refused.value.status_code == 503


@pytest.mark.parametrize(
    "argv",
    [["--listen", "nowhere"], ["--listen", "127.0.0.1:99999"], ["--timeout", "0"], []],
    ids=["listen", "port", "timeout", "no-enclave"],
)
def test_misuse_exits_2_without_a_traceback(tmp_path: Path, argv: list[str]) -> None:
    enclave = [] if not argv else ["--enclave", "127.0.0.1:1", "--manifest", str(tmp_path / "m.toml")]
    done = subprocess.run(
        [script("custos-proxy"), *enclave, *argv],
        env=isolated_env(tmp_path), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr


def test_concurrent_streams_through_the_proxy_never_take_more_tokens_than_granted(tmp_path: Path) -> None:
    granted = 120
    with (
        serving_llm(tmp_path, balance=granted, lease_size=granted, generation_streams=2) as served,
        proxy(tmp_path, served.address, served.manifest_file) as port,
    ):

        def one(i: int) -> int:
            try:
                stream = client(port).chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": f"question {i:02d}"}],
                    max_tokens=12,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                last = list(stream)[-1]
            except openai.RateLimitError:
                return 0
            assert last.usage is not None
            return last.usage.total_tokens

        with ThreadPoolExecutor(8) as pool:
            charged = sum(pool.map(one, range(12)))
        assert 0 < charged <= granted
        poll(lambda: served.daemon.lease.reserved == 0)
        assert served.daemon.lease.committed == charged


def test_a_client_that_goes_away_before_a_non_streaming_answer_cancels_it(tmp_path: Path) -> None:
    model = EchoModel(pace=threading.Semaphore(0))
    assert model.pace is not None
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "abcdefgh"}], "max_tokens": 12}
    ).encode()
    with (
        serving_llm(tmp_path, model=model) as served,
        proxy(tmp_path, served.address, served.manifest_file) as port,
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as http:
            http.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (port, len(body), body)
            )
            model.pace.release(3)
            poll(lambda: model.computed == 3)
        # The HTTP client is gone with the model waiting on its 4th token: the enclave settles now.
        lease = served.daemon.lease
        poll(lambda: lease.reserved == 0)
        model.pace.release(50)
        poll(lambda: model.running == 0)
        prompt = len(model.encode_chat([ChatMessage("user", "abcdefgh")]))
        assert lease.committed == prompt + 3  # the prompt and the 3 tokens produced, of 12 asked
        assert model.computed <= 4
