"""Connection.generate and custos-query chat against a real enclave daemon serving the echo
TEST DOUBLE (tests/llm_double.py): verified first, then streamed, metered per token."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from client import connect
from client.cli import main
from client.errors import InvalidInputError, QuotaExhaustedError
from client.generation import Delta
from tests.llm_double import EchoModel
from tests.llm_enclave import serving_llm


def test_generate_streams_deltas_then_the_usage(tmp_path: Path) -> None:
    with serving_llm(tmp_path) as served, connect(served.address, served.manifest) as enclave:
        answer = enclave.generate("héllo", max_tokens=10)
        deltas = list(answer)
        assert all(isinstance(d, Delta) for d in deltas)
        assert "".join(d.text for d in deltas) == answer.text == "héllo"
        assert answer.usage is not None
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 6)
        assert answer.usage.finish_reason == "stop"
        assert sum(d.tokens for d in deltas) == 6

        chat = enclave.generate(messages=[{"role": "user", "content": "hi"}], max_tokens=3, stop=["zz"])
        assert "".join(d.text for d in chat) == "[us"
        assert chat.usage is not None
        assert chat.usage.finish_reason == "length"


def test_cancelling_a_stream_charges_only_what_was_produced(tmp_path: Path) -> None:
    model = EchoModel(pace=threading.Semaphore(0))
    with serving_llm(tmp_path, model=model) as served, connect(served.address, served.manifest) as enclave:
        assert model.pace is not None
        model.pace.release(2)
        with enclave.generate("abcdefgh", max_tokens=8) as answer:
            first = [next(answer), next(answer)]
        assert [d.text for d in first] == ["a", "b"]
        assert answer.usage is not None
        assert answer.usage.finish_reason == "cancelled"
        lease = served.daemon.lease
        _wait(lambda: lease.reserved == 0)
        model.pace.release(50)
        _wait(lambda: model.running == 0)
        # The prompt (BOS and 8 bytes) and the 2 tokens produced; the one the model was waiting to
        # compute when the stream was cancelled is computed (released above), never charged, and the
        # iterator is closed after it.
        assert lease.committed == 9 + 2
        assert model.computed <= 3


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        pytest.param({"prompt": ""}, "prompt is empty", id="empty"),
        pytest.param({"prompt": "a\udc80"}, "not valid UTF-8", id="lone-surrogate"),
        pytest.param({"prompt": "hi", "max_tokens": -1}, "max_tokens must be 0 to", id="max-tokens"),
        pytest.param({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'", id="role"),
        pytest.param({"prompt": "hi", "temperature": 3.0}, "temperature must be 0 to 2", id="temperature"),
        pytest.param({"prompt": "x" * 64}, "prompt is 65 tokens", id="over-long"),
        pytest.param({"prompt": "x" * 80}, "prompt is over 64 bytes", id="over-long-bytes"),
        pytest.param({"prompt": "hi", "max_tokens": 100}, "max_tokens must be 1 to 61", id="over-context"),
    ],
)
def test_bad_input_gets_its_reason_and_costs_nothing(
    tmp_path: Path, call: dict[str, object], reason: str
) -> None:
    with serving_llm(tmp_path) as served, connect(served.address, served.manifest) as enclave:
        with pytest.raises(InvalidInputError, match=reason):
            list(enclave.generate(**call))  # type: ignore[arg-type]
        assert (served.daemon.lease.committed, served.daemon.lease.reserved) == (0, 0)


def test_quota_runs_out_mid_answer_then_refuses(tmp_path: Path) -> None:
    with (
        serving_llm(tmp_path, balance=12, lease_size=12) as served,
        connect(served.address, served.manifest) as enclave,
    ):
        answer = enclave.generate("abcdefgh", max_tokens=8)
        assert "".join(d.text for d in answer) == "abc"
        assert answer.usage is not None
        assert (answer.usage.finish_reason, answer.usage.remaining_quota) == ("quota", 0)
        with pytest.raises(QuotaExhaustedError):
            list(enclave.generate("a", max_tokens=1))


def test_chat_prints_the_answer_and_with_json_the_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving_llm(tmp_path) as served:
        flags = ["--enclave", served.address, "--manifest", str(served.manifest_file), "--max-tokens", "5"]
        assert main(["chat", *flags, "hello there"]) == 0
        out, err = capsys.readouterr()
        assert out == "[user\n"
        assert "verified against the manifest" in err
        assert "(length: " in err

        assert main(["chat", *flags, "--raw", "--json", "hey"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert (doc["text"], doc["finish_reason"]) == ("hey", "stop")
        assert doc["usage"] == {"prompt_tokens": 4, "completion_tokens": 3}
        assert doc["verified"] is True
        assert doc["deployment"] == served.gateway.deployment


def test_chat_without_a_prompt_converses_line_by_line_in_a_real_process(tmp_path: Path) -> None:
    with serving_llm(tmp_path) as served:
        query = Path(sys.executable).parent / "custos-query"
        done = subprocess.run(
            [str(query), "chat", "--enclave", served.address, "--manifest", str(served.manifest_file),
             "--json", "--raw", "--max-tokens", "4"],
            input="first\nsecond line\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        turns = [json.loads(line) for line in done.stdout.splitlines()]
        assert [t["text"] for t in turns] == ["firs", "seco"]
        assert [t["finish_reason"] for t in turns] == ["length", "length"]


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "--max-tokens", "-1", "x"],
        ["chat", "--temperature", "9", "x"],
        ["chat", "--top-p", "0", "x"],
        ["chat", "--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e", "x"],
        ["chat", "--enclave", "nohostport", "x"],
        ["chat", "--raw", "--system", "be brief", "x"],
    ],
    ids=["max-tokens", "temperature", "top-p", "stops", "address", "raw-with-system"],
)
def test_chat_misuse_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main([*argv[:1], "--enclave", "127.0.0.1:1", "--manifest", str(manifest), *argv[1:]])
    assert exit_.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def _wait(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait for ``condition`` (bounded, so a bug fails instead of hanging); no timing is asserted."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
