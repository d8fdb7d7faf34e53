# Custos developer entry points. The README's two commands create .venv and run `just demo` / `just test`.
set shell := ["bash", "-euo", "pipefail", "-c"]
export PATH := justfile_directory() + "/.venv/bin:" + env_var('PATH')

default:
    @just --list

# Regenerate the typed gRPC code from protos/custos.proto (committed; a test checks for drift).
protos:
    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
        --plugin=protoc-gen-mypy=.venv/bin/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=.venv/bin/protoc-gen-mypy_grpc \
        --mypy_out=. --mypy_grpc_out=. protos/custos.proto

# Run the whole test suite (unit, integration with real processes over loopback).
test *ARGS:
    python -m pytest {{ARGS}}

# Format check, lint and strict type check.
lint:
    ruff format --check .
    ruff check .
    mypy

# Rebuild the demo classifier from scikit-learn's bundled digits (deterministic).
model:
    python bench/models/digits/train.py

# Custodian, enclave (simulated platform) and queries, locally, through the real CLIs: the classifier, then SmolLM2.
demo:
    bash docs/demo.sh
    bash docs/demo_llm.sh

# Benchmarks, each scenario against its baseline in the same run; writes bench/out/report.{json,md}. `--quick`: < 2 min.
bench *ARGS:
    python -m bench.run {{ARGS}}
