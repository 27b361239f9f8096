"""Causal depthwise short convolution with a carried state (plain PyTorch reference).

Legend: B batch, T tokens, C channels, W kernel width. The state holds the last W-1 *inputs*
(before the convolution), oldest first; the kernel's last tap multiplies the current token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def short_conv(
    x_BTC: torch.Tensor,
    weight_CW: torch.Tensor,
    *,
    state_BCW: torch.Tensor | None = None,
    mask_BT: torch.Tensor | None = None,
    activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = silu(sum_i w[i] x_{t-W+1+i}); returns (y [B,T,C], new state [B,C,W-1]).

    `mask_BT` (1 real, 0 pad) makes pad tokens invisible: each real token convolves over the previous
    real tokens of its row (and the carried state), wherever the pads sit.
    """
    B, T, C = x_BTC.shape
    W = weight_CW.shape[-1]
    if weight_CW.shape != (C, W):
        raise ValueError(f"short_conv weight must be [{C}, W], got {tuple(weight_CW.shape)}")
    if state_BCW is None:
        state_BCW = x_BTC.new_zeros(B, C, W - 1)
    if state_BCW.shape != (B, C, W - 1):
        raise ValueError(f"short_conv state must be [{B}, {C}, {W - 1}], got {tuple(state_BCW.shape)}")
    x_BCT = torch.cat([state_BCW.to(x_BTC.dtype), x_BTC.transpose(1, 2)], dim=-1)
    order = None
    if mask_BT is not None:
        # Stable-sort pads to the front so the real tokens sit right after the state, in order.
        valid = torch.cat([mask_BT.new_ones(B, W - 1), mask_BT], dim=-1).to(torch.int8)
        order = torch.argsort(valid, dim=-1, stable=True)
        x_BCT = x_BCT.gather(-1, order[:, None, :].expand(B, C, -1))
    y_BCT = F.conv1d(x_BCT, weight_CW[:, None, :].to(x_BCT.dtype), groups=C)
    new_state = x_BCT[..., x_BCT.shape[-1] - (W - 1) :]
    if order is not None:
        # Sorted row: [P pads, W-1 state, real...]. Output j >= P ends at sorted position j + W - 1 (a real
        # token); outputs j < P are junk and go to the pads (sorted positions j). Undo the sort accordingly.
        n_pad = (mask_BT == 0).sum(-1, keepdim=True)
        j = torch.arange(T, device=x_BTC.device)[None, :]
        src = torch.where(j < n_pad, j, j + W - 1)
        dest = order.gather(-1, src) - (W - 1)
        y_BCT = torch.empty_like(y_BCT).scatter_(-1, dest[:, None, :].expand(B, C, -1), y_BCT)
    if activation:
        y_BCT = F.silu(y_BCT)
    return y_BCT.transpose(1, 2), new_state.contiguous()


def short_conv_packed(
    x_1TC: torch.Tensor, weight_CW: torch.Tensor, cu_seqlens: torch.Tensor, *, activation: bool = True
) -> torch.Tensor:
    """Packed variable-length sequences (batch 1, boundaries in cu_seqlens): no state crosses a boundary.

    One pass over the whole row: tap i of token t reads x_{t-W+1+i} only when that token belongs to
    t's sequence (its offset in the sequence is at least W-1-i), so a row of many short samples costs
    a few kernels, not a few per sample."""
    _, T, C = x_1TC.shape
    W = weight_CW.shape[-1]
    if weight_CW.shape != (C, W):
        raise ValueError(f"short_conv weight must be [{C}, W], got {tuple(weight_CW.shape)}")
    cu = cu_seqlens.to(device=x_1TC.device, dtype=torch.long)
    t = torch.arange(T, device=x_1TC.device)
    offset_T = t - cu[torch.searchsorted(cu, t, right=True) - 1]
    lag_W = torch.arange(W - 1, -1, -1, device=x_1TC.device)  # tap i looks back W-1-i tokens
    windows_TCW = F.pad(x_1TC[0], (0, 0, W - 1, 0)).unfold(0, W, 1)
    keep_TW = (offset_T[:, None] >= lag_W[None, :]).to(x_1TC.dtype)
    y_TC = (windows_TCW * (weight_CW.to(x_1TC.dtype) * keep_TW[:, None, :])).sum(-1)
    if activation:
        y_TC = F.silu(y_TC)
    return y_TC[None]
