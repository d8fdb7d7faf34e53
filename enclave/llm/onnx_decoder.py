"""``TextModel`` over an onnxruntime session of a decoder with a key/value cache, built from memory.

The graph (``custodian.llm.decoder_graph`` writes it) takes ``input_ids``, ``position_ids``,
``attention_mask`` and ``past_key_values.N.key/value``, and gives ``logits`` for the last position
and ``present.N.key/value``. A graph from onnxruntime-genai's model builder has no ``position_ids``
(its attention derives them from the mask) and gives logits for every position; both are taken
as they come. The key/value cache arrays are [batch, kv_heads, length, head_dim]. Each ``generate``
call keeps its own cache in its own arrays, so calls run in parallel threads on the one session
(``InferenceSession.run`` is thread-safe).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from enclave._daemon.errors import ModelRefusedError
from enclave.envelope import zeroize
from enclave.llm.bundle import TextModelInfo
from enclave.llm.interface import ChatMessage, SamplingParams
from enclave.llm.sampling import Sampler
from enclave.llm.text_codec import ByteDecoder, TextCodec
from enclave.llm.weights import InPlaceWeights, register, weights_in_place

logger = logging.getLogger(__name__)


def decoder_session(
    graph: bytes, weights: memoryview, *, intra_op_threads: int
) -> tuple[ort.InferenceSession, InPlaceWeights]:
    """The session and the values it reads its weights from, in place in ``weights`` (no copy):
    both must be kept, and ``weights`` alive and unchanged, for as long as the session is used."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        proto = onnx.ModelProto.FromString(graph)
    except Exception:  # protobuf's DecodeError, or anything from a graph too deep to parse
        raise ModelRefusedError("language model graph is not an ONNX model") from None
    in_place = weights_in_place(proto, weights)
    del proto
    register(options, in_place)
    try:
        session = ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for a bad model
        text = str(exc).strip().splitlines()
        raise ModelRefusedError(
            f"language model does not load in onnxruntime: {text[0][:200] if text else exc}"
        ) from None
    if in_place.copied:
        logger.info("%d bytes of weights copied: they lay unaligned in the bundle", in_place.copied)
    return session, in_place


class OnnxTextModel:
    """The model, owning the decrypted bundle its session reads the weights from: ``close`` (or the
    model's end) zeroes it; a generation running then ends with ``RuntimeError``."""

    def __init__(
        self,
        session: ort.InferenceSession,
        info: TextModelInfo,
        codec: TextCodec,
        *,
        payload: bytearray,
        weights: InPlaceWeights,
    ) -> None:
        self._session: ort.InferenceSession | None = session
        self._closed = False
        # Zeroed once, by close() or when the model is collected, after the last use of the session.
        self._wipe = weakref.finalize(self, _wipe, payload, weights)
        self._info = info
        self._codec = codec
        self._eos = frozenset(info.eos_token_ids)
        self._cache_names = [
            f"past_key_values.{i}.{part}" for i in range(info.layers) for part in ("key", "value")
        ]
        inputs = {i.name for i in session.get_inputs()}
        # onnxruntime-genai's graphs derive positions from the attention mask: no position_ids.
        self._positions = "position_ids" in inputs
        expected = {"input_ids", "attention_mask", *self._cache_names} | ({"position_ids"} & inputs)
        if inputs != expected:
            raise ModelRefusedError(
                f"language model graph inputs {sorted(inputs - expected) or ''} do not match"
                f" a {info.layers}-layer decoder (missing {sorted(expected - inputs)})"
            )
        self._outputs = ["logits", *(n.replace("past_key_values", "present") for n in self._cache_names)]
        missing = set(self._outputs) - {o.name for o in session.get_outputs()}
        if missing:
            raise ModelRefusedError(f"language model graph lacks the outputs {sorted(missing)}")

    @property
    def context_length(self) -> int:
        return self._info.context_length

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def max_token_bytes(self) -> int:
        return self._codec.max_token_bytes

    @property
    def info(self) -> TextModelInfo:
        return self._info

    def close(self) -> None:
        """Zero the bundle (and any weight copied for alignment) and release the session: the
        packed copies of the matrices onnxruntime made while loading go back to its allocator."""
        self._closed = True
        self._session = None
        self._wipe()

    def encode_prompt(self, text: str) -> list[int]:
        return self._codec.encode_prompt(text)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self._codec.encode_chat(messages)

    def decoder(self) -> ByteDecoder:
        return self._codec.decoder()

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
        sampler = Sampler(params)  # checks the parameters before the first step
        tokens = [int(t) for t in prompt]
        if not tokens:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self._info.vocab_size for t in tokens):
            raise ValueError(f"the prompt holds token ids outside the vocabulary of {self._info.vocab_size}")
        if len(tokens) >= self.context_length:
            raise ValueError(
                f"the prompt's {len(tokens)} tokens fill the model's context of {self.context_length}"
            )
        # Prompt and completion together fit the context: a token past it could never be fed back.
        return self._generate(tokens, min(params.max_tokens, self.context_length - len(tokens)), sampler)

    def _generate(self, tokens: list[int], max_tokens: int, sampler: Sampler) -> Iterator[int]:
        info = self._info
        empty = np.zeros((1, info.kv_heads, 0, info.head_dim), dtype=np.float32)
        cache = [empty] * len(self._cache_names)
        position = 0
        for _ in range(max_tokens):
            session = self._session
            if self._closed or session is None:
                raise RuntimeError("the language model was unloaded")
            feeds: dict[str, np.ndarray] = dict(zip(self._cache_names, cache, strict=True))
            feeds["input_ids"] = np.array([tokens], dtype=np.int64)
            if self._positions:
                feeds["position_ids"] = np.arange(position, position + len(tokens), dtype=np.int64)[None, :]
            feeds["attention_mask"] = np.ones((1, position + len(tokens)), dtype=np.int64)
            logits, *cache = session.run(self._outputs, feeds)
            if logits.ndim == 3:  # [batch, seq, vocab], as onnxruntime-genai's builder writes it
                logits = logits[:, -1, :]
            position += len(tokens)
            token = sampler.pick(logits[0])
            if token in self._eos:
                return
            yield token
            tokens = [token]


def _wipe(payload: bytearray, weights: InPlaceWeights) -> None:
    zeroize(payload)
    weights.wipe_copies()
