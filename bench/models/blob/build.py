"""Build a valid ONNX classifier of a chosen size, for the model-provisioning benchmark.

Run ``python bench/models/blob/build.py SIZE_MIB [--out PATH]`` (the benchmark
calls ``build`` itself and writes to ``bench/out/models/``). The graph is one
dense layer, ``input float32 [1, 256] -> MatMul -> scores float32 [1, K]``,
with ``K`` chosen so the weights take ``SIZE_MIB`` MiB; the file is that plus
a few hundred bytes. Weights are uniform random from a fixed seed (so AES-GCM
and the transport see incompressible bytes) and the scores stay finite, so the
enclave serves it like any other tensor model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[3]
OUT_DIR = ROOT / "bench" / "out" / "models"
FEATURES = 256
SEED = 50
OPSET = 17
IR_VERSION = 8
MiB = 1 << 20


def outputs_for(size_mib: int) -> int:
    return max(1, size_mib * MiB // (FEATURES * 4))


def blob_model(size_mib: int, seed: int = SEED) -> onnx.ModelProto:
    classes = outputs_for(size_mib)
    rng = np.random.default_rng(seed)
    weights = rng.random((FEATURES, classes), dtype=np.float32)
    weights -= np.float32(0.5)
    weights *= np.float32(0.1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["scores"])],
        f"blob_{size_mib}mib",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, classes])],
        [numpy_helper.from_array(weights, "weight")],
    )
    model = helper.make_model(
        graph,
        producer_name="custos bench/models/blob/build.py",
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=f"{size_mib} MiB dense layer, random weights (seed {seed}); for provisioning benchmarks.",
    )
    model.ir_version = IR_VERSION
    return model


def default_path(size_mib: int) -> Path:
    return OUT_DIR / f"blob-{size_mib}mib.onnx"


def build(size_mib: int, out: Path | None = None) -> Path:
    """Write the model (reusing a file already built with the same seed and size)."""
    out = out or default_path(size_mib)
    marker = out.with_suffix(".seed")
    if out.exists() and marker.exists() and marker.read_text() == f"{SEED}:{size_mib}":
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    partial.write_bytes(blob_model(size_mib).SerializeToString())
    partial.replace(out)
    marker.write_text(f"{SEED}:{size_mib}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size_mib", type=int, help="size of the weights in MiB")
    parser.add_argument("--out", type=Path, help="where to write the model")
    args = parser.parse_args()
    path = build(args.size_mib, args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
