"""A language model's deployment end to end, as real processes: custodian, enclave, custos-query chat.

Until the real loader (enclave.llm.loader) is merged, the enclave serves the echo TEST DOUBLE
(tests/llm_double.py), injected through the daemon's seam (enclave._daemon.text_models) by a
sitecustomize on the enclave process's PYTHONPATH only. The model added is the demo classifier
marked for the double (so that `custodian model add` loads it), and recorded as kind 'language'
in the ledger as `custodian model add FILE.gguf` will (the model half of issue 14).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from testkit.processes import DIGITS_MODEL, Enclave, enclave_manifest, script
from tests.llm_double import MARKER

from ._loopback import Loopback

pytestmark = pytest.mark.integration

_SITECUSTOMIZE = '''\
"""Written by tests/integration/test_llm_end_to_end.py for its enclave process only: serve the echo
test double through the daemon's seam, before the daemon imports it."""

import enclave._daemon.text_models

from tests.llm_double import loader

enclave._daemon.text_models.default_loader = loader
'''


class LanguageSystem(Loopback):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        marked = onnx.load(str(DIGITS_MODEL))
        onnx.helper.set_model_props(marked, {MARKER.decode(): "1"})
        model_file = tmp / "echo.onnx"
        onnx.save(marked, str(model_file))
        self.custodian.console("model", "add", str(model_file), "--name", "echo")
        with sqlite3.connect(self.custodian.data / "ledger.sqlite3") as db:
            db.execute("UPDATE models SET kind = 'language' WHERE name = 'echo'")
        site = tmp / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        self.enclave_env = {**self.env, "PYTHONPATH": f"{site}:{self.env['PYTHONPATH']}"}
        manifest = enclave_manifest(tmp / "enclave.toml", self.ca, self.env)
        created = self.custodian.console(
            "deployment",
            "create",
            "chat",
            "--model",
            "echo",
            "--manifest",
            str(manifest),
            "--lease-size",
            "100",
        )
        self.custodian.console("grant", "chat", "500")
        self.llm = Enclave(tmp / "llm-enclave", self.enclave_env)
        self.enclaves.append(self.llm)
        self.llm.start(self.custodian, self.ca, "chat", created["join_token"])


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LanguageSystem]:
    with LanguageSystem(tmp_path_factory.mktemp("llm")) as system:
        yield system


def test_chat_is_metered_in_tokens_prompt_and_completion_both_charged(system: LanguageSystem) -> None:
    manifest = system.end_user_manifest("chat")
    done = subprocess.run(
        [script("custos-query"), "chat", "--enclave", system.llm.address, "--manifest", str(manifest),
         "--raw", "--json", "hello"],
        env=system.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["text"], doc["finish_reason"]) == ("hello", "stop")
    assert doc["usage"] == {"prompt_tokens": 6, "completion_tokens": 5}
    assert doc["verified"] is True

    system.llm.stop()  # its final report settles the lease
    usage = system.custodian.usage("chat")
    assert (usage["unit"], usage["prompt_tokens"], usage["completion_tokens"]) == ("token", 6, 5)
    assert usage["used"] == 11
    assert usage["balance"] == 500 - 11
    table = subprocess.run(
        [script("custodian"), "--data", str(system.custodian.data), "usage", "chat"],
        env=system.env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "PROMPT_TOKENS  COMPLETION_TOKENS" in table.splitlines()[0]
