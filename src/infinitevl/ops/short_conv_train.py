"""Causal depthwise short conv + SiLU for training (GPU): a forward kernel and two backward kernels, no carried state.

Legend: B batch, T tokens, C channels, W kernel width, N packed sequences.

Same function as `short_conv.short_conv_packed` / `short_conv` without a state: y_t = silu(sum_i w[i] x_{t-W+1+i}),
taps before the token's sequence start read zero; the conv output is rounded to the activation dtype before the
SiLU, as the reference rounds. One difference: the reference casts the weight to x's dtype (bf16 under autocast)
and sums in it; these kernels read the weight at its own precision (float32 master weights) and sum in float32. Why not fla's `causal_conv1d` (which the layer used per conv): profiled on an H100
its forward and backward took 45 ms of a 767 ms 4B training step, several times what their bytes need. Here the
backward is two kernels: the first recomputes the conv output a tile at a time from x (nothing more is saved than
x; fla writes it out in a separate forward pass first), writes the SiLU's input gradient dpre and per-program
partial weight gradients (summed after, in a fixed order: deterministic, no atomics); the second gathers dx from
dpre (the forward's taps, looking ahead).
"""
from __future__ import annotations

import torch
import triton
from torch.autograd.function import once_differentiable
import triton.language as tl

FWD_TILE = (16, 128, 4)  # tokens, channels, warps of a forward program
DPRE_TILE = (8, 128, 4, 16)  # the backward's first kernel: tokens, channels, warps, token blocks per program
DX_TILE = (32, 128, 4)  # the backward's second kernel: tokens, channels, warps


@triton.jit
def _conv_tile(x_ptr, w_ptr, start_ptr, i_b, sxb, sxt, o_t, m_t, o_c, m_c, W: tl.constexpr, BT: tl.constexpr,
               BC: tl.constexpr, HAS_START: tl.constexpr):
    """The conv output (before rounding and SiLU) of tokens o_t x channels o_c, float32, and each token's sequence
    start: tap i of token t reads x_{t-W+1+i} when that token is in t's sequence, else zero."""
    if HAS_START:
        first = tl.load(start_ptr + o_t, mask=m_t, other=0).to(tl.int64)
    else:
        first = tl.zeros([BT], dtype=tl.int64)
    p_x = x_ptr + i_b * sxb + o_c[None, :]
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(W):
        src = o_t - (W - 1) + i
        m = ((src >= first) & m_t)[:, None] & m_c[None, :]
        b_x = tl.load(p_x + src[:, None] * sxt, mask=m, other=0.0)
        acc += b_x.to(tl.float32) * tl.load(w_ptr + o_c * W + i, mask=m_c, other=0.0).to(tl.float32)[None, :]
    return acc, first


@triton.jit
def _tile(C, T, NCB: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """A one-block program's row, tokens and channels (with masks); channel blocks vary fastest over the programs, so
    neighbours read neighbouring parts of the same token rows."""
    pid, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_c, i_t = pid % NCB, pid // NCB
    o_c = i_c * BC + tl.arange(0, BC)
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    return i_b, o_t, o_t < T, o_c, o_c < C


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, y_ptr, start_ptr, C, sxb, sxt, T, NCB: tl.constexpr, W: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr, HAS_START: tl.constexpr):
    i_b, o_t, m_t, o_c, m_c = _tile(C, T, NCB, BT, BC)
    acc, _ = _conv_tile(x_ptr, w_ptr, start_ptr, i_b, sxb, sxt, o_t, m_t, o_c, m_c, W, BT, BC, HAS_START)
    acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
    acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + (i_b * T + o_t[:, None]) * C + o_c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _conv_dpre_kernel(x_ptr, w_ptr, dy_ptr, dpre_ptr, dw_ptr, start_ptr, C, sxb, sxt, sdb, sdt, T,
                      NCB: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                      NBLK: tl.constexpr, HAS_START: tl.constexpr):
    # Backward, first kernel (W <= 4). One program: NBLK blocks of BT tokens x BC channels of one row. It recomputes
    # the conv output pre_p from x, writes dpre_p = dy_p silu'(pre_p) (x's dtype, as autograd would round it) and
    # gathers the weight gradient of tap i, dpre_p x_{p-W+1+i}, over its tokens into its partial.
    pid, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_c, i_g = pid % NCB, pid // NCB
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    p_x = x_ptr + i_b * sxb + o_c[None, :]
    p_dy = dy_ptr + i_b * sdb + o_c[None, :]
    # the weight gradient of tap i summed over the program's tokens: elementwise per token row, reduced once at the
    # end (a reduction over the token rows each block would cost a cross-warp round trip per tap)
    a0 = tl.zeros([BT, BC], dtype=tl.float32)
    a1 = tl.zeros([BT, BC], dtype=tl.float32)
    a2 = tl.zeros([BT, BC], dtype=tl.float32)
    a3 = tl.zeros([BT, BC], dtype=tl.float32)
    # the taps' weights, loaded once per program
    w0 = tl.load(w_ptr + o_c * W, mask=m_c, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(w_ptr + o_c * W + 1, mask=m_c & (W > 1), other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + o_c * W + 2, mask=m_c & (W > 2), other=0.0).to(tl.float32)[None, :]
    w3 = tl.load(w_ptr + o_c * W + 3, mask=m_c & (W > 3), other=0.0).to(tl.float32)[None, :]
    for j in range(NBLK):
        o_t = (i_g * NBLK + j).to(tl.int64) * BT + tl.arange(0, BT)
        m_t = o_t < T
        if HAS_START:
            first = tl.load(start_ptr + o_t, mask=m_t, other=0).to(tl.int64)
        else:
            first = tl.zeros([BT], dtype=tl.int64)
        # tap i of token t reads x_{t-W+1+i} within t's sequence; each tap tile is loaded once and serves both the
        # recomputed conv output and the weight gradient
        x0 = tl.load(p_x + (o_t - (W - 1))[:, None] * sxt,
                     mask=((o_t - (W - 1) >= first) & m_t)[:, None] & m_c[None, :], other=0.0).to(tl.float32)
        pre = x0 * w0
        if W > 1:
            x1 = tl.load(p_x + (o_t - (W - 2))[:, None] * sxt,
                         mask=((o_t - (W - 2) >= first) & m_t)[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            pre += x1 * w1
        if W > 2:
            x2 = tl.load(p_x + (o_t - (W - 3))[:, None] * sxt,
                         mask=((o_t - (W - 3) >= first) & m_t)[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            pre += x2 * w2
        if W > 3:
            x3 = tl.load(p_x + (o_t - (W - 4))[:, None] * sxt,
                         mask=((o_t - (W - 4) >= first) & m_t)[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            pre += x3 * w3
        pre = pre.to(dpre_ptr.dtype.element_ty).to(tl.float32)  # the forward's rounding
        sig = tl.sigmoid(pre)
        b_dy = tl.load(p_dy + o_t[:, None] * sdt, mask=m_t[:, None] & m_c[None, :], other=0.0).to(tl.float32)
        dpre = (b_dy * sig * (1.0 + pre * (1.0 - sig))).to(dpre_ptr.dtype.element_ty)
        tl.store(dpre_ptr + (i_b * T + o_t[:, None]) * C + o_c[None, :], dpre, mask=m_t[:, None] & m_c[None, :])
        dpre = dpre.to(tl.float32)
        a0 += dpre * x0
        if W > 1:
            a1 += dpre * x1
        if W > 2:
            a2 += dpre * x2
        if W > 3:
            a3 += dpre * x3
    # partial [row * groups + group, W, C]
    p_dw = dw_ptr + (i_b * (tl.num_programs(0) // NCB) + i_g) * W * C + o_c
    tl.store(p_dw, tl.sum(a0, 0), mask=m_c)
    if W > 1:
        tl.store(p_dw + C, tl.sum(a1, 0), mask=m_c)
    if W > 2:
        tl.store(p_dw + 2 * C, tl.sum(a2, 0), mask=m_c)
    if W > 3:
        tl.store(p_dw + 3 * C, tl.sum(a3, 0), mask=m_c)


@triton.jit
def _conv_dx_kernel(dpre_ptr, w_ptr, dx_ptr, start_ptr, C, T, NCB: tl.constexpr, W: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr, HAS_START: tl.constexpr):
    # Backward, second kernel: token t's gradient takes the outputs whose window holds it,
    # dx_t = sum_s w[W-1-s] dpre_{t+s} over the outputs t+s of t's sequence (the forward's taps, looking ahead).
    i_b, o_t, m_t, o_c, m_c = _tile(C, T, NCB, BT, BC)
    p_d = dpre_ptr + i_b * T * C + o_c[None, :]
    dx = tl.zeros([BT, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        o_p = o_t + s
        m_p = o_p < T
        if HAS_START:
            m_p = m_p & (tl.load(start_ptr + o_p, mask=m_p, other=0).to(tl.int64) <= o_t)  # p in t's sequence
        d = tl.load(p_d + o_p[:, None] * C, mask=m_p[:, None] & m_c[None, :], other=0.0).to(tl.float32)
        dx += d * tl.load(w_ptr + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)[None, :]
    tl.store(dx_ptr + (i_b * T + o_t[:, None]) * C + o_c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


def seq_starts(cu_seqlens: torch.Tensor | None, T: int, device) -> torch.Tensor | None:
    """[T] int32: the index of each token's sequence start in a packed row (None: no packing)."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    t = torch.arange(T, device=device)
    return cu[torch.searchsorted(cu, t, right=True) - 1].to(torch.int32)


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    # a batch of one: its row stride is never used (0 keeps the kernel's specialisation the same for every view)
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, starts):
        B, T, C = x.shape
        W = w.shape[-1]
        y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        BT, BC, warps = FWD_TILE
        ncb = triton.cdiv(C, BC)
        _conv_fwd_kernel[(ncb * triton.cdiv(T, BT), B)](
            x, w, y, starts, C, *_row_strides(x), T, NCB=ncb, W=W, BT=BT, BC=BC, HAS_START=starts is not None,
            num_warps=warps)
        ctx.save_for_backward(x, w, starts)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, starts = ctx.saved_tensors
        B, T, C = x.shape
        W = w.shape[-1]
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dpre = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        BT, BC, warps, nblk = DPRE_TILE
        ncb = triton.cdiv(C, BC)
        groups = triton.cdiv(T, BT * nblk)
        dw_part = torch.empty(B * groups, W, C, dtype=torch.float32, device=x.device)
        _conv_dpre_kernel[(ncb * groups, B)](
            x, w, dy, dpre, dw_part, starts, C, *_row_strides(x), *_row_strides(dy), T, NCB=ncb, W=W,
            BT=BT, BC=BC, NBLK=nblk, HAS_START=starts is not None, num_warps=warps)
        dw = dw_part.sum(0).t().to(w.dtype) if ctx.needs_input_grad[1] else None  # a fixed order: deterministic
        if not ctx.needs_input_grad[0]:
            return None, dw, None
        dx = torch.empty_like(dpre)
        BT, BC, warps = DX_TILE
        ncb = triton.cdiv(C, BC)
        _conv_dx_kernel[(ncb * triton.cdiv(T, BT), B)](dpre, w, dx, starts, C, T, NCB=ncb, W=W, BT=BT, BC=BC,
                                                       HAS_START=starts is not None, num_warps=warps)
        return dx, dw, None


def short_conv(x_BTC: torch.Tensor, weight_CW: torch.Tensor, *, starts_T: torch.Tensor | None = None):
    """y = silu(causal depthwise conv(x, w)), no state, with gradients. x: [B, T, C] (token and row strides free,
    channels contiguous: a slice of the fused projection is read in place); weight [C, W] in any float dtype (fp32
    master weights get fp32 gradients). starts_T (`seq_starts`): packed sequences of a batch-1 row; no tap crosses
    a boundary. Returns a contiguous [B, T, C] in x's dtype."""
    B, T, C = x_BTC.shape
    if x_BTC.stride(-1) != 1:
        raise ValueError("short_conv_train.short_conv wants channels contiguous (x.stride(-1) == 1)")
    if weight_CW.dim() != 2 or weight_CW.shape[0] != C or not 1 <= weight_CW.shape[1] <= 4:
        raise ValueError(f"short_conv weight must be [{C}, W] with W <= 4 (the kernels' taps), got "
                         f"{tuple(weight_CW.shape)}")
    if starts_T is not None and (B != 1 or starts_T.shape != (T,)):
        raise ValueError(f"packed sequences come in one row of {T} tokens, got a batch of {B} and starts "
                         f"{tuple(starts_T.shape)}")
    return _ShortConv.apply(x_BTC, weight_CW.contiguous(), starts_T)
