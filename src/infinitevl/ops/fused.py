"""Small fused kernels for the fast path (Triton, GPU): each replaces a chain of 5-12 elementwise
PyTorch kernels, which dominates decode time at batch 1 when every layer launches dozens of them.

Legend: N rows (tokens, or tokens x heads), D row width, H heads.

Each computes the same function as the PyTorch code in `layers/` it stands in for, rounding where that
code rounds (so bf16 results agree to the last bit or one ulp):
- `rms_norm`        RMSNorm.forward:       weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)
- `add_rms_norm`    RMSNorm.add_and_norm:  the residual add x + h, then rms_norm of it
- `gated_rms_norm`  GatedRMSNorm.forward:  (x32 * rsqrt(mean(x32^2) + eps) * w32 * silu(gate32)).to(dtype)
- `gdn_gates`       GatedDeltaNet's gates: g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b)
- `silu_mul`        SwiGLU's inner product: silu(gate) * up
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_x, D, eps, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    m = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    xn = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (w * xn).to(y_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight_D.dtype), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight_D, y, x2.stride(0), D, eps, BD=triton.next_power_of_2(D))
    return y.view(*x.shape[:-1], D)


@triton.jit
def _add_rms_norm_kernel(x_ptr, h_ptr, w_ptr, s_ptr, y_ptr, D, eps, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    m = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    s = (x + h).to(s_ptr.dtype.element_ty)  # the residual stream, rounded as `x + h` would be
    tl.store(s_ptr + row * D + cols, s, mask=m)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, 0) / D + eps)
    sn = (s * rstd).to(s_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (w * sn).to(y_ptr.dtype.element_ty), mask=m)


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight_D: torch.Tensor, eps: float):
    """(x + h, rms_norm(x + h)) in one pass."""
    D = x.shape[-1]
    assert x.shape == h.shape and x.dtype == h.dtype
    x2, h2 = x.reshape(-1, D).contiguous(), h.reshape(-1, D).contiguous()
    s = torch.empty_like(x2)
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight_D.dtype), device=x.device)
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](x2, h2, weight_D, s, y, D, eps, BD=triton.next_power_of_2(D))
    return s.view(x.shape), y.view(x.shape)


@triton.jit
def _gated_rms_norm_kernel(x_ptr, g_ptr, w_ptr, y_ptr, NH, stride_g, D, eps, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (token, head)
    cols = tl.arange(0, BD)
    m = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    # the gate may be a column slice of a fused projection: token rows `stride_g` apart, heads contiguous
    g = tl.load(g_ptr + (row // NH) * stride_g + (row % NH) * D + cols, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    y = x * rstd * w * (g * tl.sigmoid(g))
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=m)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """x, gate [..., H, D]; the gate's heads must be contiguous, its tokens may be strided."""
    D, NH = x.shape[-1], x.shape[-2]
    assert gate.shape == x.shape
    x2 = x.reshape(-1, D).contiguous()
    g3 = gate.reshape(-1, NH, D)
    if g3.stride(-1) != 1 or g3.stride(-2) != D:
        g3 = g3.contiguous()
    y = torch.empty_like(x2)
    if x2.shape[0]:
        _gated_rms_norm_kernel[(x2.shape[0],)](x2, g3, weight_D, y, NH, g3.stride(0), D, eps,
                                               BD=triton.next_power_of_2(D))
    return y.view(x.shape)


@triton.jit
def _gdn_gates_kernel(a_ptr, b_ptr, A_log_ptr, dt_bias_ptr, mask_ptr, g_ptr, beta_ptr, n, H, stride_a, stride_b,
                      BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    h = offs % H
    tok = offs // H
    a = tl.load(a_ptr + tok * stride_a + h, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + tok * stride_b + h, mask=m, other=0.0).to(tl.float32)
    A_log = tl.load(A_log_ptr + h, mask=m, other=0.0).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + h, mask=m, other=0.0).to(tl.float32)
    x = a + dt_bias
    # torch's softplus: linear above 20
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    g = -tl.exp(A_log) * softplus
    beta = tl.sigmoid(b)
    if HAS_MASK:
        # padding: no decay and no write, so the token leaves the state untouched (ops.gated_delta.mask_padding)
        keep = tl.load(mask_ptr + offs // H, mask=m, other=0) != 0
        g = tl.where(keep, g, 0.0)
        beta = tl.where(keep, beta, 0.0)
    tl.store(g_ptr + offs, g, mask=m)
    tl.store(beta_ptr + offs, beta, mask=m)


def gdn_gates(
    a_BTH: torch.Tensor,
    b_BTH: torch.Tensor,
    A_log_H: torch.Tensor,
    dt_bias_H: torch.Tensor,
    *,
    mask_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, beta), both float32 [B, T, H], from the raw a_proj / b_proj outputs (heads contiguous, tokens may
    be strided); zero where mask_BT is 0."""
    H = a_BTH.shape[-1]
    a, b = a_BTH.reshape(-1, H), b_BTH.reshape(-1, H)
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    mask = None if mask_BT is None else mask_BT.contiguous()
    g = torch.empty(a_BTH.shape, dtype=torch.float32, device=a.device)
    beta = torch.empty_like(g)
    n = g.numel()
    BLOCK = 1024
    if n:
        _gdn_gates_kernel[(triton.cdiv(n, BLOCK),)](a, b, A_log_H, dt_bias_H, mask, g, beta, n, H, a.stride(0),
                                                    b.stride(0), BLOCK=BLOCK, HAS_MASK=mask is not None)
    return g, beta


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs, (s * u).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _silu_mul_fused_kernel(gu_ptr, y_ptr, n, I, stride_gu, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    row, col = offs // I, offs % I
    g = tl.load(gu_ptr + row * stride_gu + col, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + col, mask=m, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs, (s * u).to(y_ptr.dtype.element_ty), mask=m)


def silu_mul_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up where gate_up = [gate | up] along the last dim (one fused projection)."""
    I2 = gate_up.shape[-1]
    I = I2 // 2
    gu = gate_up.reshape(-1, I2)
    gu = gu if gu.stride(-1) == 1 else gu.contiguous()
    y = torch.empty(*gate_up.shape[:-1], I, dtype=gate_up.dtype, device=gate_up.device)
    n = y.numel()
    BLOCK = 2048
    if n:
        _silu_mul_fused_kernel[(triton.cdiv(n, BLOCK),)](gu, y, n, I, gu.stride(0), BLOCK=BLOCK)
    return y


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    assert gate.shape == up.shape and gate.dtype == up.dtype
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    BLOCK = 2048
    if n:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)
    return y
