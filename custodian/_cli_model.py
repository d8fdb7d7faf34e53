"""``custodian model add`` and ``model list``: ONNX classifiers as they are, language models converted.

A GGUF file (recognised by its magic, whatever its name) is converted here, in the console, to a
language-model bundle (``custodian.llm.convert``), with progress on stderr; an onnxruntime-genai
model folder (a directory) is packed into one as it is (``custodian.llm.genai_folder``). The
bundle is uploaded like any model, and the custodian's load check loads it and lets it generate
before sealing it. The plaintext bundle stays in this process's memory; it is never written to disk.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from custodian._cli_admin import console_for
from custodian._cli_audit import emit
from custodian._cli_output import plain, table
from custodian.errors import ConsoleError
from custodian.llm import supported_architectures
from custodian.model_check import kind_of_inputs

_GGUF_MAGIC = b"GGUF"
_MODEL_COLUMNS = ("name", "kind", "inputs", "size", "chunk_count", "sha384", "created_at")


def add_model_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    model = commands.add_parser("model", help="models at rest").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    add = model.add_parser(
        "add",
        parents=[common],
        help="check that a model loads (a language model: and generates), then seal it at rest",
    )
    add.add_argument(
        "file",
        type=Path,
        help="an ONNX classifier; a GGUF language model, converted here to an ONNX decoder"
        f" (architectures: {supported_architectures()}); or an onnxruntime-genai model folder",
    )
    add.add_argument(
        "--name",
        help="model name, 1-64 letters, digits, '.', '_' or '-'"
        " (default: the file name without its extension)",
    )
    add.add_argument(
        "--keep-gguf-blocks",
        action="store_true",
        help="a GGUF's Q4_0, Q4_1 and Q8_0 matrices stay in their blocks (MatMulNBits): a bundle about the"
        " GGUF's size instead of float32's, decoding slower on CPU (default: float32)",
    )
    add.set_defaults(run=_model_add)
    model.add_parser(
        "list", parents=[common], help="list the models: kind (classifier or language) and input"
    ).set_defaults(run=_model_list)


def _model_add(args: argparse.Namespace) -> None:
    path: Path = args.file
    name = args.name or path.stem
    gguf = _is_gguf(path)
    if args.keep_gguf_blocks and not gguf:
        raise ConsoleError(f"--keep-gguf-blocks is for a GGUF file, and {path} is not one")
    if gguf or path.is_dir():
        from custodian.llm.genai_folder import bundle_genai_folder  # onnx: slow to import, needed here only

        bundle = (
            _convert(path, keep_blocks=args.keep_gguf_blocks, quiet=args.json)
            if gguf
            else (bundle_genai_folder(path))
        )
        with console_for(args) as console:
            info = plain(console.add_model_data(name, bundle))
        loads = "loads, generates"
    else:
        with console_for(args) as console:
            info = plain(console.add_model(name, path))
        loads = "loads"
    info["kind"] = kind_of_inputs(info["inputs"])
    emit(
        args,
        info,
        f"{info['kind']} model {info['name']} {loads} (input {info['inputs']}) and is sealed:"
        f" {info['size']} bytes, sha384 {info['sha384']}",
    )


def _model_list(args: argparse.Namespace) -> None:
    with console_for(args) as console:
        models = [plain(m) for m in console.list_models()]
    for model in models:
        model["kind"] = kind_of_inputs(model["inputs"])
    emit(args, models, table(models, _MODEL_COLUMNS))


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(_GGUF_MAGIC)) == _GGUF_MAGIC
    except IsADirectoryError:
        return False
    except OSError as exc:
        raise ConsoleError(f"cannot read {path}: {exc.strerror}") from None


def _convert(path: Path, *, keep_blocks: bool, quiet: bool) -> bytearray:
    from custodian.llm.convert import convert_gguf  # gguf and onnx: slow to import, needed here only

    started = time.monotonic()
    say: Callable[[str], None] = (lambda _: None) if quiet else _progress_line
    say(f"converting {path.name} to an ONNX decoder: reading")
    bundle = convert_gguf(
        path, progress=lambda done, total: say(f"converting {path.name}: layer {done}/{total}")
    )
    say(
        f"converted {path.name} in {time.monotonic() - started:.1f} s: {len(bundle) / 1e6:.0f} MB;"
        " uploading for the load check\n"
    )
    return bundle


def _progress_line(text: str) -> None:
    """One line rewritten in place on a terminal; lines as they come otherwise."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text.rstrip("\n") + ("\n" if text.endswith("\n") else ""))
    else:
        sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()
