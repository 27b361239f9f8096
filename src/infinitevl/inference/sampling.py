"""Token sampling without host synchronisation (greedy, temperature, top-k, top-p).

Sampling draws argmax(probs / Exponential(1)), which picks index i with probability probs[i]
and needs no multinomial (and so no sync): it can run inside a captured CUDA graph.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 1e4  # far above any useful value (at 100 the draw is already near uniform); float32-safe


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise ValueError(f"top_k must be a whole number (0 = off), got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature:g}")
        if not 0 <= self.top_k < 2**31:
            raise ValueError(f"top_k must be in [0, 2**31) (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from the last-position logits [B, V]."""
    if params.temperature == 0:
        return logits_BV.argmax(-1)
    # a tiny temperature is near-greedy, not an overflow to inf/NaN (the engine's sample_rows clamps alike)
    logits = logits_BV.float() / max(params.temperature, MIN_TEMPERATURE)
    if params.top_k:  # exactly k tokens, also when logits tie at the k-th place
        keep = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).indices
        logits = torch.full_like(logits, float("-inf")).scatter(-1, keep, logits.gather(-1, keep))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)
