"""Fused training kernels (forward and backward, CUDA), mostly from flash-linear-attention: the decoder's RMSNorm
(alone and after the residual add; its backward is ours, ops/rms_norm_train.py), the Gated DeltaNet output's gated
RMSNorm, and the head's cross-entropy (the MLP's SwiGLU is ours too: ops/swiglu_train.py). Their plain-PyTorch
formulas in layers/norm.py and the training losses are the reference (tests/gpu/test_train_kernels.py compares
values and gradients).

Why: in a training step of the 4B shape these ran as ~6-10 elementwise PyTorch kernels each over the float32
residual stream, forward, again in the checkpoint recompute, and in backward (autograd's saved intermediates).

The RMSNorm writes its output in the autocast dtype when autocast is on: every consumer is a linear layer, which
autocast would cast to that dtype anyway, so the forward values are the same and the 6 separate casts of one norm
output (the GDN's q/k/v/g/a/b projections) go away. In backward, autograd then sums the consumers' gradients of
that output in bf16 rather than float32 (a relative error of ~4e-3 instead of ~3e-3 against float64 with 6
consumers, found by review): within the training gate's tolerance (worst gradient 7.8e-3 of 2e-2 on an H100).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes x's matmuls in (x's own when autocast is off)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype: torch.dtype):
        from fla.modules.norm.layernorm import layer_norm_fwd

        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        with torch.cuda.device(x.device):
            y, _, rstd, _ = layer_norm_fwd(x2, weight, None, eps, out_dtype=out_dtype, is_rms_norm=True)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        from .rms_norm_train import rms_norm_backward

        x2, weight, rstd = ctx.saved_tensors
        dx, _, dw = rms_norm_backward(dy.reshape(x2.shape), x2, weight, rstd, need_dw=ctx.needs_input_grad[1])
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x), computed in float32; output in the autocast dtype (else x's)."""
    return _RMSNorm.apply(x, weight, eps, autocast_dtype(x))


class _AddRMSNorm(torch.autograd.Function):
    """(s, y) = (x + h, weight * s / rms(s)): the residual add and the next norm in one kernel each way. Forward
    writes s in x's dtype (the float32 residual stream) and y in out_dtype; backward gets d y and d s (the
    stream's gradient from later layers), adds them after the norm's backward and writes the sum twice: in x's
    dtype for the stream, in h's for the sub-layer (what autograd's add and cast kernels did separately)."""

    @staticmethod
    def forward(ctx, x, h, weight, eps: float, out_dtype: torch.dtype):
        from fla.modules.norm.layernorm import layer_norm_fwd

        D = x.shape[-1]
        x2, h2 = x.reshape(-1, D).contiguous(), h.reshape(-1, D).contiguous()
        with torch.cuda.device(x.device):
            y, _, rstd, s = layer_norm_fwd(h2, weight, None, eps, residual=x2, out_dtype=out_dtype, is_rms_norm=True)
        ctx.save_for_backward(s, weight, rstd)
        ctx.shape, ctx.h_dtype = x.shape, h.dtype
        ctx.set_materialize_grads(False)  # the final norm's stream output is unused: no zero gradient to read
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, ds, dy):
        from .rms_norm_train import rms_norm_backward

        s, weight, rstd = ctx.saved_tensors
        dy = torch.zeros_like(s) if dy is None else dy.reshape(s.shape)
        ds = None if ds is None else ds.reshape(s.shape)
        dx, dh, dw = rms_norm_backward(dy, s, weight, rstd, ds=ds, h_dtype=ctx.h_dtype,
                                       need_dw=ctx.needs_input_grad[2])
        if dh is None:  # same dtype: one buffer; autograd may accumulate into a gradient in place, so two
            dh = dx.clone()
        return dx.view(ctx.shape), dh.view(ctx.shape), dw, None, None


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + h, rms_norm(x + h)): the sum in x's dtype (the residual stream; at least as wide as h's; float32 for
    the norm of the sum to be the norm of the rounded sum), the norm in float32, written in the autocast dtype
    (else x's)."""
    if torch.promote_types(x.dtype, h.dtype) != x.dtype:
        raise ValueError(f"the residual stream ({x.dtype}) must be at least as wide as the update ({h.dtype})")
    return _AddRMSNorm.apply(x, h, weight, eps, autocast_dtype(x))


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight * silu(gate) over the last dim, in x's dtype."""
    from fla.modules.norm.fused_norm_gate import rms_norm_gated

    return rms_norm_gated(x, gate, weight, None, activation="swish", eps=eps)


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_n CE(h_n @ w^T, t_n), a chunk of positions at a time, with the gradients computed in the forward: fla's
    cross-entropy kernels read a chunk's bf16 logits once for the log-sum-exp and turn them, in place, into
    d loss / d logits = softmax - onehot; two matmuls then give that chunk's dh (and dw when w trains). Backward
    only scales them by the incoming gradient. Against the reference (losses._ce_chunk under checkpoint), this
    drops the logits' recompute matmul and the float32 copies of the [chunk, V] logits in three passes."""

    @staticmethod
    def forward(ctx, h, w, t, chunk: int, dtype: torch.dtype):
        from fla.modules.fused_cross_entropy.ops import cross_entropy_bwd, cross_entropy_fwd

        hc, wc = h.to(dtype).contiguous(), w.to(dtype)
        n = hc.shape[0]
        dh = torch.empty_like(hc) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        ones = torch.ones(min(chunk, n), device=h.device, dtype=torch.float32)
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        with torch.cuda.device(h.device):
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                logits = hc[s:e] @ wc.t()  # [C, V] in the compute dtype, as the autocast head's output
                loss, _, lse, _, _ = cross_entropy_fwd(logits, t[s:e])
                total += loss.sum()
                cross_entropy_bwd(logits, t[s:e], lse, ones[: e - s], inplace_backward=True)
                if dh is not None:
                    dh[s:e] = logits @ wc
                if dw is not None:
                    dw += (logits.t() @ hc[s:e]).float()
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, w.dtype)
        return total

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if dh is None else (dh * g).to(h_dtype), None if dw is None else (dw * g).to(w_dtype), None,
                None, None)


def linear_cross_entropy_sum(h_ND: torch.Tensor, w_VD: torch.Tensor, t_N: torch.Tensor, *, chunk: int = 4096):
    """Sum of next-token cross-entropy of the head w over rows h (no ignored targets), in the autocast dtype
    (else h's), with the gradients computed chunk by chunk in the forward."""
    return _LinearCrossEntropySum.apply(h_ND, w_VD, t_N, chunk, autocast_dtype(h_ND))
