"""The committed generated code must be exactly what `just protos` produces.

Exactly, but for the tool versions it stamps in (the grpcio and protobuf releases it was made
with, each the floor it asks of the runtime): a new grpcio-tools release on PyPI changes those
lines and nothing else, and must not fail a clean checkout's CI. The runtime checks that floor
itself at import, which every other test does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("custos_pb2.py", "custos_pb2.pyi", "custos_pb2_grpc.py", "custos_pb2_grpc.pyi")
_STAMPS = (
    (re.compile(r"^GRPC_GENERATED_VERSION = '[0-9.]+'$", re.M), "GRPC_GENERATED_VERSION = 'V'"),
    (re.compile(r"^# Protobuf Python Version: [0-9.]+$", re.M), "# Protobuf Python Version: V"),
    (re.compile(r"(_runtime_version\.Domain\.PUBLIC,\n)\s*\d+,\n\s*\d+,\n\s*\d+,"), r"\1    V,"),
)


def without_version_stamps(code: str) -> str:
    for stamp, placeholder in _STAMPS:
        code = stamp.sub(placeholder, code)
    return code


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
        fresh = without_version_stamps((tmp_path / "protos" / name).read_text())
        committed = without_version_stamps((ROOT / "protos" / name).read_text())
        assert fresh == committed, f"protos/{name} is stale: run `just protos`"


def test_only_the_version_stamps_are_ignored() -> None:
    committed = (ROOT / "protos" / "custos_pb2.py").read_text()
    assert without_version_stamps(committed) != committed  # the stamps are found
    changed = committed.replace("_sym_db = _symbol_database.Default()", "_sym_db = None")
    assert without_version_stamps(changed) != without_version_stamps(committed)
    grpc_code = (ROOT / "protos" / "custos_pb2_grpc.py").read_text()
    assert "GRPC_GENERATED_VERSION = 'V'" in without_version_stamps(grpc_code)
