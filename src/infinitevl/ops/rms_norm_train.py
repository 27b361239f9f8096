"""The backward of training's RMSNorm (alone, or after the residual add), one Triton kernel (GPU).

Legend: N rows (tokens), D model dim.

Forward (fla's layer_norm_fwd, ops/train_kernels): y = w * s * rstd with rstd = 1 / sqrt(mean(s^2) + eps), where s is
the norm's input (after the add: the residual stream x + h). Backward, in float32 per row:

    ds_norm = rstd * (w dy - s_hat * mean(s_hat * w dy)),  s_hat = s * rstd
    dx = ds_norm + ds          (ds: the stream's gradient from later layers, when the add is fused)
    dw = sum over rows of dy * s_hat   (only when the weight trains)

dx is written in the stream's dtype and, when the add is fused, a second time in the update h's dtype (the two
inputs of the add get the same gradient). The reference is the formula in layers/norm.py under autograd
(tests/gpu/test_train_kernels.py).

Why not fla's layer_norm_bwd (what training used before): profiled on an H200 in a 4B training step it moved the
backward's bytes at ~2 TB/s and took 19 ms of ~695; it computes the weight gradient also when the weight is frozen.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import launch_on

TILE = (4, 8, 8)  # rows per block, blocks per program, warps


@triton.jit
def _rms_norm_bwd_kernel(s_ptr, dy_ptr, ds_ptr, w_ptr, rstd_ptr, dx_ptr, dh_ptr, dw_ptr, N, D,
                         BD: tl.constexpr, BR: tl.constexpr, NBLK: tl.constexpr, HAS_DS: tl.constexpr,
                         HAS_DH: tl.constexpr, HAS_DW: tl.constexpr):
    pid = tl.program_id(0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    dw = tl.zeros([BD], dtype=tl.float32)
    for blk in range(NBLK):
        rows = (pid.to(tl.int64) * NBLK + blk) * BR + tl.arange(0, BR)
        m_r = rows < N
        m = m_r[:, None] & m_d[None, :]
        off = rows[:, None] * D + o_d[None, :]
        s = tl.load(s_ptr + off, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=m_r, other=0.0)
        s_hat = s * rstd[:, None]
        wdy = w[None, :] * dy
        c = tl.sum(s_hat * wdy, axis=1) / D
        dx = rstd[:, None] * (wdy - s_hat * c[:, None])
        if HAS_DS:
            dx += tl.load(ds_ptr + off, mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_DH:
            tl.store(dh_ptr + off, dx.to(dh_ptr.dtype.element_ty), mask=m)
        if HAS_DW:
            dw += tl.sum(dy * s_hat, axis=0)
    if HAS_DW:
        tl.store(dw_ptr + pid * BD + o_d, dw, mask=m_d)


def rms_norm_backward(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *,
                      ds: torch.Tensor | None = None, h_dtype: torch.dtype | None = None, need_dw: bool = True):
    """(dx, dh, dw) of the norm of s ([N, D] rows, contiguous) given dy (and ds, the stream's own gradient, when
    the add is fused). dx in s's dtype; dh the same values in h_dtype (None when h_dtype is None or equal to s's:
    then dx serves both); dw in the weight's dtype, or None unless need_dw."""
    N, D = s.shape
    if dy.shape != s.shape or (ds is not None and ds.shape != s.shape) or weight.shape != (D,):
        raise ValueError(f"rms_norm_backward: dy {tuple(dy.shape)}, ds {None if ds is None else tuple(ds.shape)} "
                         f"and weight {tuple(weight.shape)} must match s {tuple(s.shape)}")
    dy, s, rstd, weight = dy.contiguous(), s.contiguous(), rstd.contiguous(), weight.contiguous()
    ds = None if ds is None else ds.contiguous()
    dx = torch.empty_like(s)
    dh = torch.empty(N, D, dtype=h_dtype, device=s.device) if h_dtype not in (None, s.dtype) else None
    BR, NBLK, warps = TILE
    BD = triton.next_power_of_2(D)
    grid = triton.cdiv(N, BR * NBLK)
    dw_part = torch.empty(grid, BD, dtype=torch.float32, device=s.device) if need_dw else None
    if N:
        with launch_on(s):
            _rms_norm_bwd_kernel[(grid,)](
                s, dy, ds, weight, rstd, dx, dh, dw_part, N, D, BD=BD, BR=BR, NBLK=NBLK, HAS_DS=ds is not None,
                HAS_DH=dh is not None, HAS_DW=need_dw, num_warps=warps)
    dw = None
    if need_dw:  # per-program partials summed in a fixed order: deterministic, no atomics
        dw = dw_part[:, :D].sum(0).to(weight.dtype) if N else torch.zeros_like(weight)
    return dx, dh, dw
