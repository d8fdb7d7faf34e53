"""The ONNX decoder built from the tiny Llama's weights agrees with the numpy reference."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from custodian.llm.decoder_graph import WEIGHTS_FILE, DecoderShape, ExternalWeights, build_decoder
from tests.unit.llm.tiny_llama import reference
from tests.unit.llm.tiny_llama.weights import SHAPE, tiny_weights

TINY = DecoderShape(
    layers=SHAPE.layers,
    hidden=SHAPE.hidden,
    heads=SHAPE.heads,
    kv_heads=SHAPE.kv_heads,
    head_dim=SHAPE.head_dim,
    ffn=SHAPE.ffn,
    vocab=SHAPE.vocab,
    rope_theta=SHAPE.rope_theta,
    rms_eps=SHAPE.rms_eps,
)
PROMPT = [280, 308, 297, 81, 274, 85, 12, 200]


def _session() -> ort.InferenceSession:
    weights = ExternalWeights()
    source = tiny_weights()
    model = build_decoder(TINY, source.__getitem__, weights)
    options = ort.SessionOptions()
    options.add_external_initializers_from_files_in_memory(
        [WEIGHTS_FILE], [weights.view()], [len(weights.view())]
    )
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _step(
    session: ort.InferenceSession, tokens: list[int], past: list[np.ndarray], mask: list[int]
) -> tuple[np.ndarray, list[np.ndarray]]:
    past_length = past[0].shape[2]
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([tokens], dtype=np.int64),
        "position_ids": np.arange(past_length, past_length + len(tokens), dtype=np.int64)[None, :],
        "attention_mask": np.array([mask], dtype=np.int64),
    }
    for i in range(TINY.layers):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    logits, *present = session.run(None, feeds)
    return logits[0], present


def _empty_cache() -> list[np.ndarray]:
    return [np.zeros((1, TINY.kv_heads, 0, TINY.head_dim), np.float32) for _ in range(2 * TINY.layers)]


def test_prefill_logits_match_the_reference() -> None:
    logits, present = _step(_session(), PROMPT, _empty_cache(), [1] * len(PROMPT))
    expected = reference.logits(tiny_weights(), SHAPE, PROMPT)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert present[0].shape == (1, TINY.kv_heads, len(PROMPT), TINY.head_dim)


def test_greedy_decoding_with_the_cache_matches_the_reference_token_for_token() -> None:
    session, cache, produced = _session(), _empty_cache(), []
    tokens = PROMPT
    for _ in range(24):
        logits, cache = _step(session, tokens, cache, [1] * (cache[0].shape[2] + len(tokens)))
        tokens = [int(np.argmax(logits))]
        produced.append(tokens[0])
    assert produced == reference.greedy(tiny_weights(), SHAPE, PROMPT, 24, eos=set())


def test_left_padding_is_masked_out() -> None:
    padded = [0, 0, 0, *PROMPT]
    mask = [0, 0, 0] + [1] * len(PROMPT)
    feeds = {
        "input_ids": np.array([padded], dtype=np.int64),
        "position_ids": np.array([[0, 0, 0, *range(len(PROMPT))]], dtype=np.int64),
        "attention_mask": np.array([mask], dtype=np.int64),
    }
    for i in range(TINY.layers):
        for part in ("key", "value"):
            feeds[f"past_key_values.{i}.{part}"] = _empty_cache()[0]
    logits = _session().run(["logits"], feeds)[0][0]
    np.testing.assert_allclose(logits, reference.logits(tiny_weights(), SHAPE, PROMPT), rtol=1e-4, atol=1e-4)


def test_query_heads_must_share_key_value_heads_evenly() -> None:
    with pytest.raises(ValueError, match="cannot share"):
        DecoderShape(1, 12, heads=3, kv_heads=2, head_dim=4, ffn=8, vocab=4, rope_theta=1e4, rms_eps=1e-5)
