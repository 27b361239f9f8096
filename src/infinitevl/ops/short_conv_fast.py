"""Fast causal depthwise short convolution (GPU): same function and state layout as `short_conv.py`.

Legend: B batch, T tokens, C channels, W kernel width, N packed sequences.

- decode (T == 1): one Triton kernel reads the state [B, C, W-1] and the token, writes y, and shifts the
  state in place (no allocation, no copy: safe inside a CUDA graph).
- prefill (T > 1) and packed sequences without gradients: flash-linear-attention's `causal_conv1d` kernel. Its
  state is [N, C, W] (the last W inputs); ours keeps the last W-1, so it goes in padded with one zero column (the
  kernel never reads it) and comes back without its first column.
Training (gradients on, no state) has its own kernels: `short_conv_train.py`.
Padding masks (`mask_BT`) are not handled here: the layer sends masked chunks to the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _conv_step_kernel(x_ptr, s_ptr, w_ptr, y_ptr, keep_ptr, C, stride_xb, W: tl.constexpr, BC: tl.constexpr,
                      BW: tl.constexpr, ACTIVATION: tl.constexpr, HAS_KEEP: tl.constexpr):
    i_c, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    o_w = tl.arange(0, BW)
    m_c = o_c < C
    p_s = s_ptr + i_b * C * (W - 1) + o_c[:, None] * (W - 1)
    # window = [state_0 .. state_{W-2}, x]: oldest first, the last tap multiplies the current token
    b_x = tl.load(x_ptr + i_b * stride_xb + o_c, mask=m_c, other=0.0)
    b_win = tl.load(p_s + o_w[None, :], mask=m_c[:, None] & (o_w < W - 1)[None, :], other=0.0)
    b_win = tl.where((o_w == W - 1)[None, :], b_x[:, None], b_win)
    b_wt = tl.load(w_ptr + o_c[:, None] * W + o_w[None, :], mask=m_c[:, None] & (o_w < W)[None, :], other=0.0)
    b_y = tl.sum(b_win.to(tl.float32) * b_wt.to(tl.float32), 1)
    if ACTIVATION:
        # round like the reference (conv output in the activation dtype, then SiLU)
        b_y = b_y.to(y_ptr.dtype.element_ty).to(tl.float32)
        b_y = b_y * tl.sigmoid(b_y)
    tl.store(y_ptr + i_b * C + o_c, b_y.to(y_ptr.dtype.element_ty), mask=m_c)
    # new state = window[1:]: read before any write of this program's rows, so in place is safe
    b_new = tl.load(p_s + (o_w + 1)[None, :], mask=m_c[:, None] & (o_w + 1 < W - 1)[None, :], other=0.0)
    b_new = tl.where((o_w == W - 2)[None, :], b_x[:, None].to(b_new.dtype), b_new)
    m_store = m_c[:, None] & (o_w < W - 1)[None, :]
    if HAS_KEEP:
        # a padding token (keep 0) must not enter the state
        m_store = m_store & (tl.load(keep_ptr + i_b) != 0)
    tl.store(p_s + o_w[None, :], b_new, mask=m_store)


def short_conv_step(
    x_B1C: torch.Tensor,
    weight_CW: torch.Tensor,
    state_BCW: torch.Tensor,
    *,
    keep_B: torch.Tensor | None = None,
    activation: bool = True,
) -> torch.Tensor:
    """One token per row: returns y [B, 1, C] and advances `state_BCW` ([B, C, W-1]) in place, except
    for rows with keep_B == 0 (padding)."""
    B, T, C = x_B1C.shape
    W = weight_CW.shape[-1]
    assert T == 1 and state_BCW.shape == (B, C, W - 1) and state_BCW.is_contiguous()
    assert state_BCW.dtype == x_B1C.dtype, "the conv state is kept in the activation dtype"
    assert x_B1C.stride(-1) == 1 and weight_CW.is_contiguous()
    y = torch.empty(B, 1, C, dtype=x_B1C.dtype, device=x_B1C.device)
    keep = None if keep_B is None else keep_B.contiguous()
    BC = 256
    _conv_step_kernel[(triton.cdiv(C, BC), B)](
        x_B1C, state_BCW, weight_CW, y, keep, C, x_B1C.stride(0),
        W=W, BC=BC, BW=triton.next_power_of_2(W), ACTIVATION=activation, HAS_KEEP=keep is not None,
    )
    return y


@triton.jit
def _conv_step3_kernel(x0, x1, x2, s0, s1, s2, w0, w1, w2, y0, y1, y2, keep_ptr, C0, C1, C2, sx0, sx1, sx2,
                       W: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr, ACTIVATION: tl.constexpr,
                       HAS_KEEP: tl.constexpr):
    # programs [0, nb0) serve the first conv, [nb0, nb0 + nb1) the second, the rest the third
    i_c, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    nb0, nb1 = tl.cdiv(C0, BC), tl.cdiv(C1, BC)
    if i_c < nb0:
        x_ptr, s_ptr, w_ptr, y_ptr, C, blk, stride_xb = x0, s0, w0, y0, C0, i_c, sx0
    elif i_c < nb0 + nb1:
        x_ptr, s_ptr, w_ptr, y_ptr, C, blk, stride_xb = x1, s1, w1, y1, C1, i_c - nb0, sx1
    else:
        x_ptr, s_ptr, w_ptr, y_ptr, C, blk, stride_xb = x2, s2, w2, y2, C2, i_c - nb0 - nb1, sx2
    o_c = blk * BC + tl.arange(0, BC)
    o_w = tl.arange(0, BW)
    m_c = o_c < C
    p_s = s_ptr + i_b * C * (W - 1) + o_c[:, None] * (W - 1)
    b_x = tl.load(x_ptr + i_b * stride_xb + o_c, mask=m_c, other=0.0)
    b_win = tl.load(p_s + o_w[None, :], mask=m_c[:, None] & (o_w < W - 1)[None, :], other=0.0)
    b_win = tl.where((o_w == W - 1)[None, :], b_x[:, None], b_win)
    b_wt = tl.load(w_ptr + o_c[:, None] * W + o_w[None, :], mask=m_c[:, None] & (o_w < W)[None, :], other=0.0)
    b_y = tl.sum(b_win.to(tl.float32) * b_wt.to(tl.float32), 1)
    if ACTIVATION:
        b_y = b_y.to(y_ptr.dtype.element_ty).to(tl.float32)
        b_y = b_y * tl.sigmoid(b_y)
    tl.store(y_ptr + i_b * C + o_c, b_y.to(y_ptr.dtype.element_ty), mask=m_c)
    b_new = tl.load(p_s + (o_w + 1)[None, :], mask=m_c[:, None] & (o_w + 1 < W - 1)[None, :], other=0.0)
    b_new = tl.where((o_w == W - 2)[None, :], b_x[:, None].to(b_new.dtype), b_new)
    m_store = m_c[:, None] & (o_w < W - 1)[None, :]
    if HAS_KEEP:
        m_store = m_store & (tl.load(keep_ptr + i_b) != 0)
    tl.store(p_s + o_w[None, :], b_new, mask=m_store)


def short_conv_step3(xs, weights, states, *, keep_B: torch.Tensor | None = None, activation: bool = True):
    """`short_conv_step` for three convs at once (GDN's q, k, v): one launch instead of three.
    xs: three [B, 1, C_i] (rows may be strided), weights [C_i, W], states [B, C_i, W-1] advanced in place."""
    B = xs[0].shape[0]
    W = weights[0].shape[-1]
    Cs = [x.shape[-1] for x in xs]
    for x, w, s, C in zip(xs, weights, states, Cs):
        assert x.shape == (B, 1, C) and x.stride(-1) == 1 and w.shape == (C, W)
        assert w.is_contiguous() and s.shape == (B, C, W - 1) and s.is_contiguous() and s.dtype == x.dtype
    ys = [torch.empty(B, 1, C, dtype=xs[0].dtype, device=xs[0].device) for C in Cs]
    keep = None if keep_B is None else keep_B.contiguous()
    BC = 256
    grid = (sum(triton.cdiv(C, BC) for C in Cs), B)
    _conv_step3_kernel[grid](*xs, *states, *weights, *ys, keep, *Cs, *(x.stride(0) for x in xs),
                             W=W, BC=BC, BW=triton.next_power_of_2(W), ACTIVATION=activation,
                             HAS_KEEP=keep is not None)
    return ys


CHUNK3_TILE = (32, 128, 4)  # tokens, channels, warps of a `_conv_chunk3_kernel` program


@triton.jit
def _conv_chunk3_kernel(x0, x1, x2, s0, s1, s2, w0, w1, w2, y0, y1, y2, C0, C1, C2, sxb0, sxt0, sxb1, sxt1,
                        sxb2, sxt2, T, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr,
                        ACTIVATION: tl.constexpr):
    # one program: BT tokens x BC channels of one row and one of the three convs. The window of token t is the
    # inputs t-W+1 .. t of the row continued from the state (the last W-1 inputs, oldest first). Only the first
    # token block's program touches the state (BT >= W-1): it reads it, then rewrites it, so in place is safe.
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # tokens first: no 65535 cap
    nb0, nb1 = tl.cdiv(C0, BC), tl.cdiv(C1, BC)
    if i_c < nb0:
        x_ptr, s_ptr, w_ptr, y_ptr, C, blk, sxb, sxt = x0, s0, w0, y0, C0, i_c, sxb0, sxt0
    elif i_c < nb0 + nb1:
        x_ptr, s_ptr, w_ptr, y_ptr, C, blk, sxb, sxt = x1, s1, w1, y1, C1, i_c - nb0, sxb1, sxt1
    else:
        x_ptr, s_ptr, w_ptr, y_ptr, C, blk, sxb, sxt = x2, s2, w2, y2, C2, i_c - nb0 - nb1, sxb2, sxt2
    o_c = blk * BC + tl.arange(0, BC)
    m_c = o_c < C
    p_x = x_ptr + i_b * sxb + o_c[None, :]
    p_s = s_ptr + i_b * C * (W - 1) + o_c[None, :] * (W - 1)
    o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)  # long prefills: token x stride passes 2^31
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(W):
        src = o_t - (W - 1) + i  # < 0: the state's slot W-1+src
        b_x = tl.load(p_x + src[:, None] * sxt, mask=((src >= 0) & (src < T))[:, None] & m_c[None, :], other=0.0)
        # src < 0 only in the first token block
        b_x += tl.load(p_s + (W - 1 + src)[:, None], mask=(src < 0)[:, None] & m_c[None, :], other=0.0)
        b_w = tl.load(w_ptr + o_c * W + i, mask=m_c, other=0.0)
        acc += b_x.to(tl.float32) * b_w.to(tl.float32)[None, :]
    if ACTIVATION:
        # round like the reference (conv output in the activation dtype, then SiLU)
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        acc = acc * tl.sigmoid(acc)
    m_y = (o_t < T)[:, None] & m_c[None, :]
    tl.store(y_ptr + i_b * T * C + o_t[:, None] * C + o_c[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_y)
    if i_t == 0:
        # the window loop's state loads may sit in other threads than these stores: all reads land first
        tl.debug_barrier()
        # new state slot j = combined input T + j (combined = state ++ x): x[T + j - (W-1)], or old slot T + j
        o_w = tl.arange(0, BW)
        s_src = (T + o_w - (W - 1)).to(tl.int64)
        m_w = (o_w < W - 1)[:, None] & m_c[None, :]
        b_new = tl.load(p_x + s_src[:, None] * sxt, mask=m_w & (s_src >= 0)[:, None], other=0.0)
        b_old = tl.load(p_s + (T + o_w)[:, None], mask=m_w & (s_src < 0)[:, None], other=0.0)
        b_new = tl.where((s_src >= 0)[:, None], b_new.to(b_old.dtype), b_old)
        tl.store(p_s + o_w[:, None], b_new, mask=m_w)


def short_conv_chunk3(xs, weights, states, *, activation: bool = True, tile: tuple[int, int, int] | None = None):
    """A chunk of T >= 1 tokens through three convs at once (GDN's q, k, v), continuing from and advancing
    their states in place: one launch and no state copies (the fla path pads, slices and copies each state).
    xs: three [B, T, C_i] (token and row strides free, channels contiguous), weights [C_i, W], states
    [B, C_i, W-1] in the activation dtype. No padding mask: padded prefills take the reference. tile: (tokens,
    channels, warps) of a program, for benchmarks/bench_short_conv.py (default: CHUNK3_TILE)."""
    B, T = xs[0].shape[:2]
    W = weights[0].shape[-1]
    Cs = [x.shape[-1] for x in xs]
    for x, w, s, C in zip(xs, weights, states, Cs):
        assert x.shape == (B, T, C) and x.stride(-1) == 1 and w.shape == (C, W) and w.is_contiguous()
        assert s.shape == (B, C, W - 1) and s.is_contiguous() and s.dtype == x.dtype
    ys = [torch.empty(B, T, C, dtype=xs[0].dtype, device=xs[0].device) for C in Cs]
    BT, BC, warps = tile or CHUNK3_TILE
    assert W - 1 <= BT
    grid = (triton.cdiv(T, BT), sum(triton.cdiv(C, BC) for C in Cs), B)
    strides = [st for x in xs for st in (x.stride(0), x.stride(1))]
    _conv_chunk3_kernel[grid](*xs, *states, *weights, *ys, *Cs, *strides, T, W=W, BT=BT, BC=BC,
                              BW=triton.next_power_of_2(W - 1), ACTIVATION=activation, num_warps=warps)
    return ys


def short_conv(
    x_BTC: torch.Tensor,
    weight_CW: torch.Tensor,
    *,
    state_BCW: torch.Tensor | None = None,
    activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk of T tokens continuing from `state_BCW` (or zeros): (y [B,T,C], new state [B,C,W-1])."""
    from fla.modules.causal_conv1d import causal_conv1d

    B, T, C = x_BTC.shape
    W = weight_CW.shape[-1]
    init = None if state_BCW is None else F.pad(state_BCW.to(x_BTC.dtype), (1, 0)).contiguous()
    y, final = causal_conv1d(
        x=x_BTC, weight=weight_CW.contiguous(), initial_state=init, output_final_state=True,
        activation="silu" if activation else None,
    )
    return y, final[..., 1:].contiguous()


def short_conv_packed(
    x_1TC: torch.Tensor, weight_CW: torch.Tensor, cu_seqlens: torch.Tensor, *, activation: bool = True
) -> torch.Tensor:
    """Packed variable-length sequences (batch 1): no state crosses a boundary."""
    from fla.modules.causal_conv1d import causal_conv1d

    y, _ = causal_conv1d(
        x=x_1TC, weight=weight_CW.contiguous(), activation="silu" if activation else None,
        cu_seqlens=cu_seqlens.to(device=x_1TC.device, dtype=torch.long),
    )
    return y
