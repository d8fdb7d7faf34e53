"""Loading a language model in the enclave from its sealed bundle (``enclave.llm.bundle``), in memory.

``is_text_model`` tells a language model's bundle from a classifier (an ONNX file) by its first
bytes. ``load_text_model`` builds the onnxruntime session with the weights handed over from memory
(never a file), the tokenizer from its JSON text, the chat template from the metadata; then it
zeroes the payload, which the session no longer needs (onnxruntime copied the weights).
"""

from __future__ import annotations

import logging

from enclave._daemon.errors import ModelRefusedError
from enclave.envelope import zeroize
from enclave.errors import FormatError
from enclave.llm import bundle
from enclave.llm.interface import TextModel
from enclave.llm.onnx_decoder import OnnxTextModel, decoder_session
from enclave.llm.text_codec import TextCodec

logger = logging.getLogger(__name__)


def is_text_model(payload: bytes | bytearray | memoryview) -> bool:
    return bundle.is_text_model(payload)


def load_text_model(payload: bytearray, *, intra_op_threads: int) -> TextModel:
    """The loaded model; ``ModelRefusedError`` naming what is wrong. ``payload`` is zeroed either way."""
    try:
        try:
            parts = bundle.read_bundle(payload)
        except FormatError as exc:
            raise ModelRefusedError(f"language model bundle: {exc}") from None
        tokenizer = parts.tokenizer.tobytes()
        # The session first: the tokenizer's memory (about 10 % of SmolLM2's bundle, some of it
        # kept by Python's allocator after parsing) then does not add to onnxruntime's load peak.
        session = decoder_session(parts.graph.tobytes(), parts.weights, intra_op_threads=intra_op_threads)
        parts.weights.release()
        try:
            codec = TextCodec(tokenizer, parts.info)
        except FormatError as exc:
            raise ModelRefusedError(f"language model bundle: {exc}") from None
        model = OnnxTextModel(session, parts.info, codec)
    finally:
        zeroize(payload)
    logger.info(
        "language model %r loaded: %s, %d layers, context %d, %d tokens",
        parts.info.name,
        parts.info.architecture,
        parts.info.layers,
        parts.info.context_length,
        parts.info.vocab_size,
    )
    return model
