"""RMSNorm (Qwen2 style) and the gated RMSNorm of the Gated DeltaNet output."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = "torch"  # set by InfiniteVL.set_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "fla" and not torch.is_grad_enabled():  # fused kernels: forward only
            from ..ops import fused

            return fused.rms_norm(x, self.weight, self.eps)
        if self.backend == "fla" and x.is_cuda:  # training: fla's kernels with backward
            from ..ops import train_kernels

            return train_kernels.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_and_norm(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + h, norm(x + h)): a residual add and the next norm (one kernel on the fast backend)."""
        if self.backend == "fla" and not torch.is_grad_enabled() and x.dtype == h.dtype:
            from ..ops import fused

            return fused.add_rms_norm(x, h, self.weight, self.eps)
        if self.backend == "fla" and x.is_cuda and torch.is_grad_enabled() and x.dtype == torch.float32:
            # training (the float32 residual stream): fla's add + norm forward, our backward kernel. The sum is exact
            # torch's `x + h`; a narrower stream would be normalised before its rounding, so it takes the formula.
            from ..ops import train_kernels

            return train_kernels.add_rms_norm(x, h, self.weight, self.eps)
        s = x + h
        return s, self(s)


class GatedRMSNorm(nn.Module):
    """rmsnorm(x) * weight * silu(gate), normalised over the last dim (one head's values)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = "torch"  # set by InfiniteVL.set_backend

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self.backend == "fla" and not torch.is_grad_enabled():
            from ..ops import fused

            return fused.gated_rms_norm(x, gate, self.weight, self.eps)
        if self.backend == "fla" and x.is_cuda:
            from ..ops import train_kernels

            return train_kernels.gated_rms_norm(x, gate, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        y = x32 * self.weight.float() * F.silu(gate.float())
        return y.to(dtype)
