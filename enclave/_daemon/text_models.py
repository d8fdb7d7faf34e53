"""Language models in the daemon: which pushed models generate text, and loading them.

The one place the serving side reaches the loading side (``enclave.llm.loader``:
``is_text_model`` and ``load_text_model``). The daemon takes a ``TextModelLoader``;
``default_loader`` imports the real one lazily, when the first model arrives.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from enclave.llm.interface import TextModel

_LOADER_MODULE = "enclave.llm.loader"


@dataclass(frozen=True)
class TextModelLoader:
    """``recognises(payload)``: whether the decrypted model is a language model;
    ``load(payload, intra_op_threads)``: the model, built from memory (blocking)."""

    recognises: Callable[[bytes | bytearray], bool]
    load: Callable[[bytearray, int], TextModel]


@dataclass(frozen=True)
class LoadedTextModel:
    """A language model being served, with the hash of the model it was loaded from."""

    model: TextModel
    sha384: bytes

    @property
    def sha384_hex(self) -> str:
        return self.sha384.hex()


def default_loader() -> TextModelLoader:
    """``enclave.llm.loader``'s ``is_text_model`` and ``load_text_model``, imported when first needed."""
    module = importlib.import_module(_LOADER_MODULE)
    is_text_model = cast(Callable[[bytes | bytearray], bool], module.is_text_model)
    load_text_model = cast(Callable[..., TextModel], module.load_text_model)
    return TextModelLoader(
        is_text_model, lambda payload, threads: load_text_model(payload, intra_op_threads=threads)
    )
