"""SwiGLU feed-forward block (gate/up/down), as in Qwen2.5."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, *, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.backend = "torch"  # set by InfiniteVL.set_backend
        self.gate_up = None  # FusedLinears after fuse_projections()

    def fuse_projections(self) -> None:
        from .fuse import FusedLinears

        if self.gate_up is None:
            self.gate_up = FusedLinears(self, "gate_up", [self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "fla" and not torch.is_grad_enabled():  # fused kernels: forward only
            from ..ops import fused

            if self.gate_up is not None:
                return self.down_proj(fused.silu_mul_fused(self.gate_up.project(x, backend=self.backend)))
            return self.down_proj(fused.silu_mul(self.gate_proj(x), self.up_proj(x)))
        if self.gate_up is not None:
            gate, up = self.gate_up(x)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
