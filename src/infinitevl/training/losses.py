"""Training losses, each returning a SUM over its units (tokens, or token x channel) so that the
trainer can divide by the unit count of the whole optimizer step (all micro-batches, all ranks):
the loss of a step then does not depend on how its rows were split or packed.

Legend: N positions, D model dim, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(n, s + size)


def cross_entropy_sum(hidden_ND: torch.Tensor, head_VD: torch.Tensor, targets_N: torch.Tensor, *,
                      chunk: int = 4096, backend: str = "torch") -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose target is not -100, computing the logits a
    chunk at a time (recomputed in backward) so a long row never holds [N, V] logits at once. backend 'fla'
    on a GPU with gradients: fla's fused cross-entropy kernels (ops/train_kernels.linear_cross_entropy_sum)."""
    keep = targets_N != IGNORE
    h, t = hidden_ND[keep], targets_N[keep]
    if backend == "fla" and h.is_cuda and torch.is_grad_enabled() and (h.requires_grad or head_VD.requires_grad):
        from ..ops.train_kernels import linear_cross_entropy_sum

        return linear_cross_entropy_sum(h, head_VD, t, chunk=chunk)
    total = hidden_ND.new_zeros((), dtype=torch.float32)
    for s, e in _chunks(h.shape[0], chunk):
        total = total + checkpoint(_ce_chunk, h[s:e], head_VD, t[s:e], use_reentrant=False)
    return total


def _ce_chunk(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")


def kl_sum(student_hidden_ND: torch.Tensor, student_head_VD: torch.Tensor, teacher_hidden_ND: torch.Tensor,
           teacher_head_VD: torch.Tensor, *, temperature: float, chunk: int = 2048) -> torch.Tensor:
    """Sum over positions of KL(teacher || student) of the softened distributions, times T^2 (Hinton),
    as the published stage-2 loss (nn.KLDivLoss(log_softmax(s/T), softmax(t/T)) * T^2)."""
    total = student_hidden_ND.new_zeros((), dtype=torch.float32)
    for s, e in _chunks(student_hidden_ND.shape[0], chunk):
        total = total + checkpoint(_kl_chunk, student_hidden_ND[s:e], student_head_VD, teacher_hidden_ND[s:e],
                                   teacher_head_VD, temperature, use_reentrant=False)
    return total * temperature**2


def _kl_chunk(hs, ws, ht, wt, temperature):
    log_p_s = F.log_softmax(F.linear(hs, ws).float() / temperature, dim=-1)
    with torch.no_grad():
        log_p_t = F.log_softmax(F.linear(ht, wt).float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum()


def mse_sum(student_ND: torch.Tensor, teacher_ND: torch.Tensor) -> torch.Tensor:
    return (student_ND.float() - teacher_ND.float()).pow(2).sum()
