"""Gated delta rule on flash-linear-attention's Triton kernels (GPU only; `pip install infinitevl[gpu]`).

Legend: B batch, T tokens, H heads, K key dim, V value dim, N packed sequences.

Same signatures and semantics as `reference.py`: q and k are L2-normalised inside the kernel with the
reference's eps (fla's `use_qk_l2norm_in_kernel`: x / sqrt(sum x^2 + 1e-6)), q is scaled by K^-0.5, the
decay g is applied before the delta update, and the state is float32 [N, H, K, V] in and out.
fla's positional order is (q, k, v, g, beta) like ours, but its naive references take beta before g:
everything is passed by keyword here so the two cannot be swapped.

Precision: fla computes float32 matmuls in TF32 unless TRITON_F32_DEFAULT=ieee, so against the float32
reference expect ~1e-3 relative error, not 1e-6.
"""
from __future__ import annotations

import torch
from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk
from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as _fla_recurrent


def _state_in(initial_state: torch.Tensor | None) -> torch.Tensor | None:
    if initial_state is None:
        return None
    # The carried state stays float32 between calls whatever the activation dtype.
    assert initial_state.dtype == torch.float32, "the recurrent state must be float32"
    return initial_state.contiguous()


def recurrent_gated_delta_rule(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's fused recurrent kernel: one pass over T per (sequence, head, value block). For short steps."""
    o, final = _fla_recurrent(
        q=q_BTHK, k=k_BTHK, v=v_BTHV, g=g_BTH.float(), beta=beta_BTH.float(), scale=scale,
        initial_state=_state_in(initial_state), output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens,
    )
    return o, final


def chunk_gated_delta_rule(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's chunk kernel (WY form, chunks of 64). For prefill; packed sequences through cu_seqlens."""
    if chunk_size != 64:
        raise ValueError(f"the fla chunk kernel runs chunks of 64 tokens, got chunk_size={chunk_size}")
    o, final = _fla_chunk(
        q=q_BTHK, k=k_BTHK, v=v_BTHV, g=g_BTH.float(), beta=beta_BTH.float(), scale=scale,
        initial_state=_state_in(initial_state), output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens,
    )
    return o, final


def chunk_gated_delta_rule_from_gates(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    a_BTH: torch.Tensor,
    b_BTH: torch.Tensor,
    A_log_H: torch.Tensor,
    dt_bias_H: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """Training: fla's chunk kernel given the gates' raw inputs. It computes g = -exp(A_log) * softplus(a + dt_bias)
    inside its chunk cumsum and beta = sigmoid(b) in one kernel (float32), and their gradients (A_log and dt_bias
    included) in its backward: the ~20 small elementwise kernels per layer of the PyTorch formulas go away. Same
    values as `chunk_gated_delta_rule(q, k, v, g, beta)` with g and beta from those formulas; no state in or out."""
    o, _ = _fla_chunk(
        q=q_BTHK, k=k_BTHK, v=v_BTHV, g=a_BTH, beta=b_BTH, use_qk_l2norm_in_kernel=use_qk_l2norm,
        use_gate_in_kernel=True, A_log=A_log_H, dt_bias=dt_bias_H, use_beta_sigmoid_in_kernel=True,
        cu_seqlens=cu_seqlens,
    )
    return o
