"""A language model's deployment end to end, as real processes: custodian, enclave, custos-query chat.

The model is the tiny Llama GGUF (tests/unit/llm/tiny_llama), added with `custodian model add
FILE.gguf` (converted, checked and sealed by the custodian), served by a real enclave on the sim
platform; its greedy answer through the enclave must be the numpy reference's, token for token.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from custodian.llm.convert import convert_gguf
from enclave.llm.loader import load_text_model
from testkit.processes import Enclave, enclave_manifest, script
from tests.unit.llm.tiny_llama import reference
from tests.unit.llm.tiny_llama.make import GGUF_PATH
from tests.unit.llm.tiny_llama.weights import SHAPE, tiny_weights

from ._loopback import Loopback

pytestmark = pytest.mark.integration

PROMPT = "the quick brown fox"
MAX_TOKENS = 12


class LanguageSystem(Loopback):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        added = self.custodian.console("model", "add", str(GGUF_PATH), "--name", "tiny")
        assert added["kind"] == "language"
        manifest = enclave_manifest(tmp / "enclave.toml", self.ca, self.env)
        created = self.custodian.console(
            "deployment", "create", "chat", "--model", "tiny", "--manifest", str(manifest),
            "--lease-size", "100",
        )  # fmt: skip
        self.custodian.console("grant", "chat", "500")
        self.llm = Enclave(tmp / "llm-enclave", self.env)
        self.enclaves.append(self.llm)
        self.llm.start(self.custodian, self.ca, "chat", created["join_token"])


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LanguageSystem]:
    with LanguageSystem(tmp_path_factory.mktemp("llm")) as system:
        yield system


def expected_answer() -> tuple[int, list[int], str]:
    """The prompt's token count, the reference's greedy completion and its text."""
    model = load_text_model(convert_gguf(GGUF_PATH), intra_op_threads=1)
    prompt = model.encode_prompt(PROMPT)
    completion = reference.greedy(tiny_weights(), SHAPE, prompt, MAX_TOKENS, set(model.eos_token_ids))
    decoder = model.decoder()
    text = "".join(decoder.push(token) for token in completion) + decoder.flush()
    return len(prompt), completion, text


def chat(system: LanguageSystem, *flags: str) -> subprocess.CompletedProcess[str]:
    manifest = system.end_user_manifest("chat")
    return subprocess.run(
        [script("custos-query"), "chat", "--enclave", system.llm.address, "--manifest", str(manifest),
         "--json", *flags],
        env=system.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_greedy_answer_through_the_enclave_is_the_reference_and_is_metered_in_tokens(
    system: LanguageSystem,
) -> None:
    prompt_tokens, completion, text = expected_answer()
    assert completion, "the reference produced nothing: the test would prove nothing"
    done = chat(system, "--raw", "--temperature", "0", "--max-tokens", str(MAX_TOKENS), PROMPT)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["verified"] is True
    assert doc["text"] == text
    assert doc["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(completion)}
    assert doc["finish_reason"] == ("length" if len(completion) == MAX_TOKENS else "stop")

    system.llm.stop()  # its final report settles the lease
    usage = system.custodian.usage("chat")
    assert (usage["unit"], usage["prompt_tokens"], usage["completion_tokens"]) == (
        "token",
        prompt_tokens,
        len(completion),
    )
    assert usage["used"] == prompt_tokens + len(completion)
    assert usage["balance"] == 500 - usage["used"]
    table = subprocess.run(
        [script("custodian"), "--data", str(system.custodian.data), "usage", "chat"],
        env=system.env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "PROMPT_TOKENS  COMPLETION_TOKENS" in table.splitlines()[0]
