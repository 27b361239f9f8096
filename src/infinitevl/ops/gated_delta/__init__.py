"""Gated delta rule ops. `reference` is plain PyTorch (CPU or GPU), the ground truth; `fla` runs
flash-linear-attention's kernels (GPU). `gated_delta_rule` picks the kernel by backend and regime."""
from __future__ import annotations

import torch

from .reference import chunk_gated_delta_rule, l2norm, mask_padding, recurrent_gated_delta_rule

__all__ = ["gated_delta_rule", "chunk_gated_delta_rule", "recurrent_gated_delta_rule", "l2norm", "mask_padding"]

# Up to this many tokens per sequence the fused recurrent kernel (one sequential pass) beats the chunk
# kernel's setup; it has no backward, so training always takes the chunk kernel.
FLA_RECURRENT_MAX_T = 16


def gated_delta_rule(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    *,
    backend: str = "torch",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o [B,T,H,V], final state [N,H,K,V] float32 or None): the recurrence for short steps, the chunk
    form otherwise. `backend` is already resolved ('torch' or 'fla', see ops.backend)."""
    T = q_BTHK.shape[1]
    kw = dict(initial_state=initial_state, output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm)
    if backend == "torch":
        rule = recurrent_gated_delta_rule if T == 1 else chunk_gated_delta_rule
        return rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, cu_seqlens=cu_seqlens, **kw)
    assert backend == "fla", f"unresolved backend {backend!r}"
    from . import fla

    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q_BTHK.device, dtype=torch.long)
    training = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH)
    )
    rule = fla.recurrent_gated_delta_rule if T <= FLA_RECURRENT_MAX_T and not training else fla.chunk_gated_delta_rule
    return rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, cu_seqlens=cu_seqlens, **kw)
