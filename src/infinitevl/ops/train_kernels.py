"""Fused training kernels (forward and backward, CUDA) from flash-linear-attention: the decoder's RMSNorm, the
Gated DeltaNet output's gated RMSNorm and the MLP's SwiGLU. Their plain-PyTorch formulas in layers/norm.py and
layers/mlp.py are the reference (tests/gpu/test_train_kernels.py compares values and gradients).

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


def _out_dtype(x: torch.Tensor) -> torch.dtype:
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
    def backward(ctx, dy):
        from fla.modules.norm.layernorm import layer_norm_bwd

        x2, weight, rstd = ctx.saved_tensors
        with torch.cuda.device(x2.device):
            dx, dw, _, _ = layer_norm_bwd(dy.reshape(x2.shape).contiguous(), x2, weight, None, rstd=rstd,
                                          is_rms_norm=True, x_dtype=x2.dtype)
        return dx.view(ctx.shape), dw if ctx.needs_input_grad[1] else None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x), computed in float32; output in the autocast dtype (else x's)."""
    return _RMSNorm.apply(x, weight, eps, _out_dtype(x))


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight * silu(gate) over the last dim, in x's dtype."""
    from fla.modules.norm.fused_norm_gate import rms_norm_gated

    return rms_norm_gated(x, gate, weight, None, activation="swish", eps=eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    from fla.modules.activations.ops import swiglu as fla_swiglu

    return fla_swiglu(gate, up)
