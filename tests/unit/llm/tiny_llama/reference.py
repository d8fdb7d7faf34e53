"""A straightforward numpy Llama: full recomputation at every step, no cache, Hugging Face layout.

Deliberately independent of the converter and the ONNX graph: half-split rotary embeddings, grouped
key/value heads repeated per query head, RMSNorm, SwiGLU.
"""

from __future__ import annotations

import numpy as np

from tests.unit.llm.tiny_llama.weights import TinyShape


def logits(weights: dict[str, np.ndarray], shape: TinyShape, tokens: list[int]) -> np.ndarray:
    """The next-token logits after ``tokens`` (float64 throughout)."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    n, d = len(tokens), shape.head_dim
    x = w["token_embd"][tokens]
    inv_freq = 1.0 / shape.rope_theta ** (np.arange(0, d, 2) / d) / w.get("rope_freqs", 1.0)
    angles = np.outer(np.arange(n), inv_freq)
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    causal = np.tril(np.ones((n, n), dtype=bool))
    group = shape.heads // shape.kv_heads
    for i in range(shape.layers):
        h = _rms(x, w[f"blk.{i}.attn_norm"], shape.rms_eps)
        q, k, v = (
            h @ w[f"blk.{i}.{p}"].T + w.get(f"blk.{i}.{p}.bias", 0.0) for p in ("attn_q", "attn_k", "attn_v")
        )
        q, k, v = (
            q.reshape(n, shape.heads, d),
            k.reshape(n, shape.kv_heads, d),
            v.reshape(n, shape.kv_heads, d),
        )
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        out = np.empty((n, shape.heads, d))
        for head in range(shape.heads):
            kv = head // group
            scores = q[:, head] @ k[:, kv].T / np.sqrt(d)
            scores = np.where(causal, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[:, head] = probs @ v[:, kv]
        x = x + out.reshape(n, -1) @ w[f"blk.{i}.attn_output"].T
        h = _rms(x, w[f"blk.{i}.ffn_norm"], shape.rms_eps)
        gate, up = h @ w[f"blk.{i}.ffn_gate"].T, h @ w[f"blk.{i}.ffn_up"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[f"blk.{i}.ffn_down"].T
    return _rms(x[-1], w["output_norm"], shape.rms_eps) @ w["output"].T


def greedy(
    weights: dict[str, np.ndarray], shape: TinyShape, prompt: list[int], max_tokens: int, eos: set[int]
) -> list[int]:
    """Greedy completion: up to ``max_tokens`` ids, stopping before any of ``eos``."""
    tokens, produced = list(prompt), []
    for _ in range(max_tokens):
        token = int(np.argmax(logits(weights, shape, tokens)))
        if token in eos:
            break
        tokens.append(token)
        produced.append(token)
    return produced


def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
