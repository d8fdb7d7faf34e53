"""Loading a language model in the enclave from its sealed bundle (``enclave.llm.bundle``), in memory.

``is_text_model`` tells a language model's bundle from a classifier (an ONNX file) by its first
bytes. ``load_text_model`` builds the onnxruntime session with the weights
read in place from the payload (never a file, never copied: see ``enclave.llm.weights``), the
tokenizer from its JSON text, the chat template from the metadata; then it zeroes the rest of the
payload. The model owns the payload from then on and zeroes it when it is closed.
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
    """The loaded model, which owns ``payload`` from then on (its session reads the weights there;
    ``close`` zeroes it); ``ModelRefusedError`` naming what is wrong, ``payload`` zeroed."""
    try:
        try:
            parts = bundle.read_bundle(payload)
        except FormatError as exc:
            raise ModelRefusedError(f"language model bundle: {exc}") from None
        tokenizer = parts.tokenizer.tobytes()
        # The session first: the tokenizer's memory (about 10 % of SmolLM2's bundle, some of it
        # kept by Python's allocator after parsing) then does not add to onnxruntime's load peak.
        session, weights = decoder_session(
            parts.graph.tobytes(), parts.weights, intra_op_threads=intra_op_threads
        )
        try:
            codec = TextCodec(tokenizer, parts.info)
        except FormatError as exc:
            raise ModelRefusedError(f"language model bundle: {exc}") from None
        model = OnnxTextModel(session, parts.info, codec, payload=payload, weights=weights)
    except BaseException:
        zeroize(payload)
        raise
    # Only the weights section is read from now on: the rest (graph, tokenizer, index) goes now.
    start = parts.weights_offset
    zeroize(memoryview(payload)[:start])
    zeroize(memoryview(payload)[start + len(parts.weights) :])
    logger.info(
        "language model %r loaded: %s, %d layers, context %d, %d tokens",
        parts.info.name,
        parts.info.architecture,
        parts.info.layers,
        parts.info.context_length,
        parts.info.vocab_size,
    )
    return model
