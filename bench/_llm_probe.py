"""``python -m bench._llm_probe dequantise GGUF | convert GGUF OUT | load BUNDLE``: one measured step.

Each step runs in a process of its own (``bench.scenarios.language_model`` spawns it). ``dequantise``
is the floor of a conversion: every tensor of the GGUF through ``gguf``'s dequantiser, kept nowhere.

Prints one JSON object: wall seconds and the peak resident memory the step added. The peak is
Linux's high-water mark (``VmHWM``), reset to the current size once the imports are done
(``/proc/self/clear_refs`` 5), so it counts the step alone, the model's own bytes included.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import gguf

from custodian.llm.convert import convert_gguf
from enclave.llm.interface import SamplingParams
from enclave.llm.loader import load_text_model


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def main(argv: list[str]) -> int:
    step, source = argv[0], Path(argv[1])
    if step == "dequantise":
        reader = gguf.GGUFReader(source)
        before = _reset_peak()
        started = time.perf_counter()
        size = sum(gguf.quants.dequantize(t.data, t.tensor_type).nbytes for t in reader.tensors)
        seconds = time.perf_counter() - started
    elif step == "convert":
        before = _reset_peak()
        started = time.perf_counter()
        bundle = convert_gguf(source)
        seconds = time.perf_counter() - started
        Path(argv[2]).write_bytes(bundle)
        size = len(bundle)
    elif step == "load":
        before = _reset_peak()  # the payload (the decrypted model) counts in the step
        started = time.perf_counter()
        payload = bytearray(source.stat().st_size)
        with source.open("rb") as handle:
            handle.readinto(payload)
        size = len(payload)
        model = load_text_model(payload, intra_op_threads=1)
        seconds = time.perf_counter() - started
        prompt = model.encode_prompt("Hello")
        list(model.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0)))
    else:
        raise SystemExit(f"unknown step {step!r}")
    print(json.dumps({"seconds": seconds, "peak_bytes": _status("VmHWM") - before, "model_bytes": size}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
