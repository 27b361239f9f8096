"""Matrix-vector product for batch-1 decode (Triton, GPU): y = x @ W^T (+ b) with x [1, K], W [N, K].

At one token per step every projection is a pass over its weight, so decode time is weight bytes over
achieved bandwidth. Each program streams BN whole rows of W (contiguous, 16-byte loads) against x and
reduces in float32; autotuned per (N, K). Used (layers/fuse.linear) for the projections where
`bench_gemv.py` measured it at or ahead of cuBLAS on an H100; the MLP down projection stays on cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bn in (4, 8, 16)
    for bk in (512, 1024)
    for w in (4, 8)
    for s in (3,)
]


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr):
    rn = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    m_n = rn < N
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        m_k = rk < K
        x = tl.load(x_ptr + rk, mask=m_k, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=m_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=m_n)


def gemv(x: torch.Tensor, weight_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding one row in all; returns [..., N] in x's dtype."""
    N, K = weight_NK.shape
    assert x.numel() == K and weight_NK.is_contiguous() and x.dtype == weight_NK.dtype
    x1 = x.reshape(K).contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _gemv_kernel[grid](x1, weight_NK, bias_N, y, N, K, HAS_BIAS=bias_N is not None)
    return y
