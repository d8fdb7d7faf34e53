"""The committed generated code must be exactly what `just protos` produces."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("custos_pb2.py", "custos_pb2.pyi", "custos_pb2_grpc.py", "custos_pb2_grpc.pyi")


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    plugin = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
    if plugin is None:
        pytest.fail("protoc-gen-mypy is not installed (pip install -e '.[dev]')")
    (tmp_path / "protos").mkdir()
    shutil.copy(ROOT / "protos" / "custos.proto", tmp_path / "protos" / "custos.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--grpc_python_out=.",
            f"--plugin=protoc-gen-mypy={plugin}",
            f"--plugin=protoc-gen-mypy_grpc={Path(plugin).with_name('protoc-gen-mypy_grpc')}",
            "--mypy_out=.",
            "--mypy_grpc_out=.",
            "protos/custos.proto",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "protos" / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `just protos`"
