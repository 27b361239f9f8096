"""Fast sliding-window attention pieces (Triton, GPU); `swa.py` holds the reference.

Legend: B batch, T tokens, H query heads, G kv heads, D head dim, R ring slots, S splits of the ring.

Decode (one query token per row) never copies the ring buffer: a split-K kernel reads the ring in
place, each program covering one kv head's query heads over a slice of the slots (online softmax), and a
combine kernel folds in the current token's own key/value, which is not in the ring yet: with
R = window - 1 slots the new token's slot still holds the oldest key the query must see, so the ring
is written only after attention (`ring_write_step`). Same window rule as the reference: the query with
token index i sees keys j with i - window < j <= i, and empty slots (index -1) are skipped.
Prefill with a state reads the ring (concatenated with the new keys) through PyTorch SDPA under the window
mask (ops/swa.py: `sliding_window_attention`, or `folded_gqa_attention` for short blocks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, NH, stride_x, D: tl.constexpr, HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (b, t, head) row
    bt = row // NH
    d = tl.arange(0, D)
    # x may be a column slice of a fused projection: tokens `stride_x` apart, heads contiguous
    p_x = x_ptr + bt * stride_x + (row % NH) * D
    x = tl.load(p_x + d).to(tl.float32)
    rot_src = tl.where(d < HALF, d + HALF, d - HALF)
    xr = tl.load(p_x + rot_src).to(tl.float32)
    xr = tl.where(d < HALF, -xr, xr)  # rotate_half
    dt = y_ptr.dtype.element_ty
    c = tl.load(cos_ptr + bt * D + d).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + bt * D + d).to(dt).to(tl.float32)
    # round each product like the reference (x * cos + rotate_half(x) * sin in the activation dtype)
    y = (x * c).to(dt).to(tl.float32) + (xr * s).to(dt).to(tl.float32)
    tl.store(y_ptr + row * D + d, y.to(dt))


def apply_rope(x_BTHD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """Same as ops.rope.apply_rope, in one kernel."""
    B, T, NH, D = x_BTHD.shape
    assert D % 2 == 0 and D == triton.next_power_of_2(D), "head dim must be a power of two"
    x = x_BTHD.reshape(B * T, NH, D)
    if x.stride(-1) != 1 or x.stride(-2) != D:
        x = x.contiguous()
    cos, sin = cos_BTD.contiguous(), sin_BTD.contiguous()
    assert cos.shape == (B, T, D)
    y = torch.empty(B, T, NH, D, dtype=x_BTHD.dtype, device=x_BTHD.device)
    if y.numel():
        _rope_kernel[(B * T * NH,)](x, cos, sin, y, NH, x.stride(0), D=D, HALF=D // 2)
    return y


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, cur_ptr, m_ptr, l_ptr, acc_ptr,
                         R, G, H, window, scale, SPLIT,
                         REP: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                         NS: tl.constexpr, PRECISION: tl.constexpr):
    i_s, i_bg = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, g = i_bg // G, i_bg % G
    o_h = tl.arange(0, BH)
    m_h = o_h < REP
    d = tl.arange(0, D)
    # the REP query heads served by kv head g: heads g*REP .. g*REP+REP-1
    # float32 operands: with PRECISION 'tf32' (10 mantissa bits) bf16 inputs are still exact
    q = tl.load(q_ptr + (b * H + g * REP + o_h[:, None]) * D + d[None, :], mask=m_h[:, None], other=0.0)
    q = q.to(tl.float32)
    cur = tl.load(cur_ptr + b)
    m_i = tl.full([BH], -1e30, tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, D], tl.float32)
    start = i_s * SPLIT
    for j in range(0, SPLIT, BS):
        o_s = start + j + tl.arange(0, BS)
        in_ring = o_s < R
        idx = tl.load(idx_ptr + b * R + o_s, mask=in_ring, other=-1)
        ok = in_ring & (idx >= 0) & (idx <= cur) & (idx > cur - window)
        kv_off = ((b * R + o_s[:, None]) * G + g) * D + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    heads = g * REP + o_h
    part = (b * H + heads) * NS + i_s
    tl.store(m_ptr + part, m_i, mask=m_h)
    tl.store(l_ptr + part, l_i, mask=m_h)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=m_h[:, None])


@triton.jit
def _decode_combine_kernel(q_ptr, kn_ptr, vn_ptr, m_ptr, l_ptr, acc_ptr, o_ptr, G, H, scale,
                           REP: tl.constexpr, D: tl.constexpr, NS: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    g = h // REP
    d = tl.arange(0, D)
    sp = tl.arange(0, NS)
    q = tl.load(q_ptr + i_bh * D + d).to(tl.float32)
    kn = tl.load(kn_ptr + (b * G + g) * D + d).to(tl.float32)
    vn = tl.load(vn_ptr + (b * G + g) * D + d).to(tl.float32)
    s_new = tl.sum(q * kn, 0) * scale
    m = tl.load(m_ptr + i_bh * NS + sp)
    l = tl.load(l_ptr + i_bh * NS + sp)
    acc = tl.load(acc_ptr + (i_bh * NS + sp[:, None]) * D + d[None, :])
    M = tl.maximum(tl.max(m, 0), s_new)
    w = tl.exp(m - M)
    w_new = tl.exp(s_new - M)
    L = tl.sum(w * l, 0) + w_new
    o = (tl.sum(w[:, None] * acc, 0) + w_new * vn) / L
    tl.store(o_ptr + i_bh * D + d, o.to(o_ptr.dtype.element_ty))


def decode_attention(
    q_BHD: torch.Tensor,
    k_new_BGD: torch.Tensor,
    v_new_BGD: torch.Tensor,
    keys_BRGD: torch.Tensor,
    values_BRGD: torch.Tensor,
    token_index_BR: torch.Tensor,
    cur_idx_B: torch.Tensor,
    *,
    window: int,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per row over the ring (read in place) plus the token itself.
    Returns [B, H, D] in q's dtype."""
    B, H, D = q_BHD.shape
    R, G = keys_BRGD.shape[1], keys_BRGD.shape[2]
    REP = H // G
    assert H % G == 0 and D == triton.next_power_of_2(D) and D >= 16
    assert keys_BRGD.is_contiguous() and values_BRGD.is_contiguous() and token_index_BR.is_contiguous()
    BS = 64 if D <= 128 else 32
    if num_splits is None:
        # enough programs to fill the GPU at batch 1, each covering a whole number of blocks
        num_splits = max(1, min(64, triton.cdiv(R, BS), triton.cdiv(256, B * G)))
    NS = triton.next_power_of_2(num_splits)
    SPLIT = triton.cdiv(triton.cdiv(R, NS), BS) * BS
    q = q_BHD.contiguous()
    kn, vn = k_new_BGD.contiguous(), v_new_BGD.contiguous()
    m = torch.empty(B, H, NS, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, H, NS, D, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(NS, B * G)](
        q, keys_BRGD, values_BRGD, token_index_BR, cur_idx_B.contiguous(), m, l, acc, R, G, H, window, scale, SPLIT,
        REP=REP, BH=max(16, triton.next_power_of_2(REP)), D=D, BS=BS, NS=NS, PRECISION=precision,
    )
    o = torch.empty_like(q)
    _decode_combine_kernel[(B * H,)](q, kn, vn, m, l, acc, o, G, H, scale, REP=REP, D=D, NS=NS)
    return o


@triton.jit
def _ring_write_kernel(k_ptr, v_ptr, idx_ptr, kn_ptr, vn_ptr, cur_ptr, keep_ptr, R, G,
                       D: tl.constexpr, HAS_KEEP: tl.constexpr):
    i_bg = tl.program_id(0).to(tl.int64)
    b, g = i_bg // G, i_bg % G
    cur = tl.load(cur_ptr + b)
    keep = True
    if HAS_KEEP:
        keep = tl.load(keep_ptr + b) != 0
    if keep:
        slot = cur % R
        d = tl.arange(0, D)
        dst = ((b * R + slot) * G + g) * D + d
        tl.store(k_ptr + dst, tl.load(kn_ptr + i_bg * D + d).to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + dst, tl.load(vn_ptr + i_bg * D + d).to(v_ptr.dtype.element_ty))
        if g == 0:
            tl.store(idx_ptr + b * R + slot, cur)


def ring_write_step(state, k_new_BGD: torch.Tensor, v_new_BGD: torch.Tensor, cur_idx_B: torch.Tensor,
                    keep_B: torch.Tensor | None = None) -> None:
    """Write one token per row (token index `cur_idx_B`) into its ring slot, in place; rows with
    keep_B == 0 are left alone. Same effect as `swa.ring_write` for T == 1."""
    keys, values, idx = state.keys, state.values, state.token_index
    B, R, G, D = keys.shape
    assert keys.is_contiguous() and values.is_contiguous() and idx.is_contiguous()
    cur = cur_idx_B.contiguous()
    keep = None if keep_B is None else keep_B.contiguous()
    _ring_write_kernel[(B * G,)](
        keys, values, idx, k_new_BGD.contiguous(), v_new_BGD.contiguous(), cur, keep, R, G,
        D=D, HAS_KEEP=keep is not None,
    )

