"""Language models in the daemon: which pushed models generate text, and loading them.

The one place the serving side reaches the loading side (``enclave.llm.loader``:
``is_text_model`` and ``load_text_model``). The daemon takes a ``TextModelLoader``;
``default_loader`` imports the real one lazily, when the first model arrives.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from enclave.llm.interface import TextModel

logger = logging.getLogger(__name__)

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


def _recognises_nothing(payload: bytes | bytearray) -> bool:
    return False


def _loads_nothing(payload: bytearray, intra_op_threads: int) -> TextModel:
    raise RuntimeError("this build has no language model loader")


# What a build without ``enclave.llm.loader`` serves: classifiers only.
CLASSIFIERS_ONLY = TextModelLoader(_recognises_nothing, _loads_nothing)


def default_loader() -> TextModelLoader:
    """``enclave.llm.loader``'s ``is_text_model`` and ``load_text_model``; classifiers only without it."""
    try:
        module = importlib.import_module(_LOADER_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != _LOADER_MODULE:
            raise
        logger.info("no language model loader in this build: classifiers only")
        return CLASSIFIERS_ONLY
    is_text_model = cast(Callable[[bytes | bytearray], bool], module.is_text_model)
    load_text_model = cast(Callable[..., TextModel], module.load_text_model)
    return TextModelLoader(
        is_text_model, lambda payload, threads: load_text_model(payload, intra_op_threads=threads)
    )
