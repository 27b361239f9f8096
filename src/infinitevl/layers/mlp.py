"""SwiGLU feed-forward block (gate/up/down), as in Qwen2.5."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fuse import project_concat, train_fusable


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, *, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.backend = "torch"  # set by InfiniteVL.set_backend
        self.gate_up = None  # FusedLinears after fuse_projections()
        self.down_padded = False  # buffer down_weight_padded: down_proj's weight, input columns zero-padded

    def siblings(self) -> list[nn.Linear]:
        """The projections of the same input that run as one matmul (fuse_projections, training's
        project_concat)."""
        return [self.gate_proj, self.up_proj]

    def fuse_projections(self) -> None:
        """Inference: gate and up in one matmul. A hidden size that is not a multiple of 8 (the vision tower's
        3420) is zero-padded to a multiple of 64 in both matmuls (cuBLAS's aligned kernels: ~4x faster there)."""
        from .fuse import FusedLinears, pad_input_columns

        if self.gate_up is None:
            multiple = 1 if self.down_proj.in_features % 8 == 0 else 64
            self.gate_up = FusedLinears(self, "gate_up", self.siblings(), row_multiple=multiple)
            if multiple > 1:
                pad_input_columns(self, "down_weight_padded", self.down_proj, multiple)
                self.down_padded = True

    def _down(self, h: torch.Tensor) -> torch.Tensor:
        if self.down_padded:
            return F.linear(h, self.down_weight_padded, self.down_proj.bias)
        return self.down_proj(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "fla" and not torch.is_grad_enabled():  # fused kernels: forward only
            from ..ops import fused

            if self.gate_up is not None:  # [gate | up], each padded alike: silu(0) * 0 = 0 in the padding
                return self._down(fused.silu_mul_fused(self.gate_up.project(x, backend=self.backend)))
            return self.down_proj(fused.silu_mul(self.gate_proj(x), self.up_proj(x)))
        projs = self.siblings()
        if self.gate_up is None and train_fusable(x, projs, self.backend):
            # training on the fast backend: gate and up as one matmul, the SwiGLU kernels read its two halves and
            # write their gradients side by side (backward's dx is one matmul too)
            from ..ops import swiglu_train

            return self.down_proj(swiglu_train.swiglu_packed(project_concat(x, projs)))
        if self.gate_up is not None:
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)  # module calls, so wrappers (LoRA adapters) apply
        if self.backend == "fla" and x.is_cuda:  # training: the SwiGLU kernels with backward
            from ..ops import swiglu_train

            return self.down_proj(swiglu_train.swiglu(gate, up))
        return self.down_proj(F.silu(gate) * up)
