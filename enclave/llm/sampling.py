"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

import numpy as np

from enclave.llm.interface import SamplingParams


def check_params(params: SamplingParams) -> None:
    """``ValueError`` naming the first parameter out of range."""
    if params.max_tokens < 0:
        raise ValueError(f"max_tokens must be 0 or more, not {params.max_tokens}")
    if not 0.0 <= params.temperature <= 100.0:
        raise ValueError(f"temperature must be between 0 and 100, not {params.temperature}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p must be above 0 and at most 1, not {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be 0 (no limit) or more, not {params.top_k}")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        check_params(params)
        self._params = params
        self._rng = np.random.default_rng(params.seed)

    def pick(self, logits: np.ndarray) -> int:
        p = self._params
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / p.temperature
        candidates = np.arange(scores.size)
        if 0 < p.top_k < scores.size:
            candidates = np.argpartition(-scores, p.top_k - 1)[: p.top_k]
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # The smallest prefix whose mass reaches top_p (always at least the top token).
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self._rng.choice(order.size, p=probs)])
