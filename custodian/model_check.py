"""The load check of ``custodian model add``: a model that the enclave could not load is refused.

The plaintext is streamed, as it is sealed, to a child process running
``enclave._daemon.model_check``: the enclave's own ``ModelRuntime`` loads it
(onnxruntime, one input that is a float tensor, labels and image metadata that
agree with the graph) and reports the input. The check is the enclave's load
itself, so a model that passes loads on the borrower's side too; it runs in a
child so that onnxruntime stays out of the custodian's process (the model
runtime is its only importer) and a model that crashes or exhausts the loader
takes down only the check. Nothing touches the disk: the child reads stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from dataclasses import dataclass

from custodian.errors import InvalidRequestError

# Loading a multi-gigabyte model takes a while on a busy machine; a check that hangs is refused.
CHECK_TIMEOUT_SECONDS = 600.0
_MAX_ANSWER_BYTES = 64 << 10


@dataclass(frozen=True)
class ModelInput:
    name: str
    type: str
    # One entry per dimension: a number, or "?" where the model leaves it free (the batch, say).
    shape: tuple[str, ...]
    # "image" (the model carries preprocessing metadata) or "tensor" for a classifier; "language" for
    # a language model, whose one input is its token sequence, up to its context length.
    kind: str

    def describe(self) -> str:
        return f"{self.name} {self.type}[{','.join(self.shape)}] {self.kind}"


class ModelCheck:
    """One model's check: ``feed`` it the plaintext in parts, then ``result`` loads it."""

    def __init__(self, process: asyncio.subprocess.Process, timeout: float) -> None:
        self._process = process
        self._timeout = timeout

    @classmethod
    async def start(cls, *, limit_seconds: float = CHECK_TIMEOUT_SECONDS) -> ModelCheck:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "enclave._daemon.model_check",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return cls(process, limit_seconds)

    async def feed(self, part: bytes) -> None:
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a dead child answers in result
            self._process.stdin.write(part)
            await self._process.stdin.drain()

    async def result(self) -> tuple[ModelInput, ...]:
        """The model's inputs once it loaded; ``InvalidRequestError`` with the reason when it did not."""
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._process.stdin.close()
        try:
            answer = await asyncio.wait_for(self._process.stdout.read(_MAX_ANSWER_BYTES), self._timeout)
            code = await asyncio.wait_for(self._process.wait(), self._timeout)
        except TimeoutError:
            raise InvalidRequestError(f"model did not load within {self._timeout:.0f} s") from None
        finally:
            await self.stop()
        try:
            doc = json.loads(answer)
        except ValueError:
            doc = {}
        if code == 0 and "inputs" in doc:
            return tuple(
                ModelInput(i["name"], i["type"], tuple(i["shape"]), i["kind"]) for i in doc["inputs"]
            )
        reason = doc.get("refused") or f"the load check ended with status {code}"
        raise InvalidRequestError(f"{reason}; nothing was stored")

    async def stop(self) -> None:
        """End the child if it still runs (the upload failed, or the check is over)."""
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        await self._process.wait()


def kind_of_inputs(inputs: str) -> str:
    """ "language" or "classifier", from a model's inputs as ``ModelInfo.inputs`` describes them."""
    return "language" if inputs.endswith(" language") else "classifier"


def inputs_to_json(inputs: tuple[ModelInput, ...]) -> str:
    return json.dumps(
        [{"name": i.name, "type": i.type, "shape": list(i.shape), "kind": i.kind} for i in inputs]
    )


def inputs_from_json(text: str) -> tuple[ModelInput, ...]:
    """Inputs as the ledger keeps them ('' for a model added before the check existed)."""
    return tuple(
        ModelInput(i["name"], i["type"], tuple(i["shape"]), i["kind"]) for i in json.loads(text or "[]")
    )
