"""Sliding-window attention, plain PyTorch reference, plus the ring-buffer write used by decode.

Legend: B batch, T query tokens, S key tokens, H query heads, G kv heads, D head dim, R ring slots.

Window rule (FlashAttention's, as in the published model): the query with token index i sees the keys
with token index j where i - window < j <= i. Token indices count real (non-pad) tokens of a row, so
padding never shifts the window. Each kv head serves H // G consecutive query heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_mask(
    q_idx_BT: torch.Tensor,
    k_idx_BS: torch.Tensor,
    window: int,
    *,
    k_valid_BS: torch.Tensor | None = None,
    q_seg_BT: torch.Tensor | None = None,
    k_seg_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [B, T, S]: True where the query may attend the key."""
    qi, kj = q_idx_BT[:, :, None], k_idx_BS[:, None, :]
    mask = (kj <= qi) & (kj > qi - window)
    if k_valid_BS is not None:
        mask &= k_valid_BS[:, None, :].to(torch.bool)
    if q_seg_BT is not None:
        mask &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    # A query that sees nothing (a pad) would give NaN; let it see everything: its output is ignored.
    return mask | ~mask.any(-1, keepdim=True)


def _group_size(H: int, G: int) -> int:
    """Query heads per kv head (kv head g serves query heads g * rep .. g * rep + rep - 1)."""
    if H % G:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({G})")
    return H // G


def sliding_window_attention(
    q_BTHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    v_BSGD: torch.Tensor,
    mask_BTS: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention under a precomputed boolean mask (see `window_mask`). Returns [B, T, H, D]."""
    B, T, H, D = q_BTHD.shape
    G = k_BSGD.shape[2]
    rep = _group_size(H, G)
    q = q_BTHD.transpose(1, 2)
    k = k_BSGD.transpose(1, 2).repeat_interleave(rep, dim=1)
    v = v_BSGD.transpose(1, 2).repeat_interleave(rep, dim=1)
    scale = D**-0.5 if scale is None else scale
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTS[:, None], scale=scale)
    return o.transpose(1, 2)



def causal_segments_attention(
    q_BTHD: torch.Tensor,
    k_BTGD: torch.Tensor,
    v_BTGD: torch.Tensor,
    lengths: list[int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """`sliding_window_attention` for a stateless row made of independent sequences (packed samples, or one
    sequence) none longer than the window: inside each the window rule is plain causal attention, so each
    runs SDPA with is_causal (its fused kernels, forward and backward) instead of a [T, T] mask that spends
    most of its work on pairs across samples. `lengths` (host ints) sum to T. Returns [B, T, H, D]."""
    B, T, H, D = q_BTHD.shape
    rep = _group_size(H, k_BTGD.shape[2])
    if sum(lengths) != T:
        raise ValueError(f"segment lengths {lengths} do not add up to the {T} tokens")
    outs, start = [], 0
    for n in lengths:
        q = q_BTHD[:, start : start + n].transpose(1, 2)
        k = k_BTGD[:, start : start + n].transpose(1, 2).repeat_interleave(rep, dim=1)
        v = v_BTGD[:, start : start + n].transpose(1, 2).repeat_interleave(rep, dim=1)
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

def folded_gqa_attention(
    q_BTHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    v_BSGD: torch.Tensor,
    mask_BTS: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """`sliding_window_attention` for short query blocks against a long key set (a stream's frame
    against its ring): the H // G query heads of each kv head fold into the query axis, so SDPA reads each
    kv head once instead of a copy repeated H // G times (a [B, S, H, D] copy per layer at S = 8K); only
    the boolean mask is repeated, which is smaller while T < 4 D. Returns [B, T, H, D]."""
    B, T, H, D = q_BTHD.shape
    G = k_BSGD.shape[2]
    rep = _group_size(H, G)
    q = q_BTHD.reshape(B, T, G, rep, D).permute(0, 2, 3, 1, 4).reshape(B, G, rep * T, D)
    mask = mask_BTS[:, None].expand(B, rep, T, mask_BTS.shape[-1]).reshape(B, 1, rep * T, -1)
    o = F.scaled_dot_product_attention(q, k_BSGD.transpose(1, 2), v_BSGD.transpose(1, 2), attn_mask=mask,
                                       scale=D**-0.5 if scale is None else scale)
    return o.reshape(B, G, rep, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H, D)


def ring_write(
    state,
    new_k_BTGD: torch.Tensor,
    new_v_BTGD: torch.Tensor,
    new_idx_BT: torch.Tensor,
    keep_BT: torch.Tensor,
) -> None:
    """Write the kept new tokens into their ring slots (token index mod R) of `state` (an SWAState:
    keys/values [B,R,G,D], token_index [B,R]), in place.

    The caller keeps at most the last R real tokens of each row, so kept slots never collide.
    Single-token steps take a path without host syncs (safe inside a CUDA graph).
    """
    keys, values, idx = state.keys, state.values, state.token_index
    B, R = idx.shape
    slot_BT = new_idx_BT.remainder(R)
    new_k_BTGD, new_v_BTGD = new_k_BTGD.to(keys.dtype), new_v_BTGD.to(values.dtype)
    if new_k_BTGD.shape[1] == 1:
        rows = torch.arange(B, device=keys.device)
        slot, keep = slot_BT[:, 0], keep_BT[:, 0]
        keys[rows, slot] = torch.where(keep[:, None, None], new_k_BTGD[:, 0], keys[rows, slot])
        values[rows, slot] = torch.where(keep[:, None, None], new_v_BTGD[:, 0], values[rows, slot])
        idx[rows, slot] = torch.where(keep, new_idx_BT[:, 0], idx[rows, slot])
        return
    b, t = keep_BT.nonzero(as_tuple=True)
    keys[b, slot_BT[b, t]] = new_k_BTGD[b, t]
    values[b, slot_BT[b, t]] = new_v_BTGD[b, t]
    idx[b, slot_BT[b, t]] = new_idx_BT[b, t]


def ring_write_last(state, new_k_BTGD: torch.Tensor, new_v_BTGD: torch.Tensor, new_idx_BT: torch.Tensor) -> None:
    """`ring_write` for a chunk without padding: the last min(T, R) tokens of every row, by shapes alone
    (no host sync, so a chunk of a fixed size can be captured in a CUDA graph). Consecutive token indices
    fill distinct slots."""
    keys, values, idx = state.keys, state.values, state.token_index
    B, R = idx.shape
    T = new_idx_BT.shape[1]
    if T > R:
        new_k_BTGD, new_v_BTGD, new_idx_BT = new_k_BTGD[:, -R:], new_v_BTGD[:, -R:], new_idx_BT[:, -R:]
    slot_BT = new_idx_BT.remainder(R)
    rows = torch.arange(B, device=keys.device)[:, None]
    keys[rows, slot_BT] = new_k_BTGD.to(keys.dtype)
    values[rows, slot_BT] = new_v_BTGD.to(values.dtype)
    idx[rows, slot_BT] = new_idx_BT
