"""Inference-time fusion of sibling projections that read the same input into one matmul.

At batch 1 a decode step is bound by reading the weights, and cuBLAS reads a 50 MB matrix far closer to
full bandwidth than six separate 0.07-17 MB ones (measured on H100: 1.2 TB/s for 2048x2048, 2.4 TB/s for
11008x2048). `fuse_linears` concatenates the weights into one tensor and rebinds each nn.Linear's weight
(and bias) as a view of it: no extra memory, parameter names and values unchanged. Because the views share
one storage, save checkpoints from an unfused model (safetensors refuses shared tensors).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "torch"):
    """F.linear, or on the fast backend the Triton GEMV when x is a single row (batch-1 decode)."""
    if backend == "fla" and x.is_cuda and x.numel() == weight.shape[1] and weight.is_contiguous():
        from ..ops.gemv import gemv

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def train_fusable(x: torch.Tensor, linears: list[nn.Linear], backend: str) -> bool:
    """Whether `project_together` applies: training (gradients on) on the fast backend's GPU, every projection a
    plain nn.Linear (a PEFT-wrapped one, LoRA, must run as a module call so its adapter applies)."""
    return backend == "fla" and x.is_cuda and torch.is_grad_enabled() and all(type(m) is nn.Linear for m in linears)


def project_together(x: torch.Tensor, linears: list[nn.Linear]) -> list[torch.Tensor]:
    """Training: sibling projections of x as one matmul over their weights concatenated in this forward (cast
    first to the autocast dtype, as autocast would cast each). Backward then computes dx in one matmul instead of
    one per projection plus the adds that sum them, and each weight gets its slice of one weight gradient. Same
    values as the separate projections; outputs are views of one [..., sum(out)] tensor."""
    from ..ops.train_kernels import autocast_dtype

    dtype = autocast_dtype(x)
    weight = torch.cat([m.weight.to(dtype) for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias.to(dtype) for m in linears])
    return list(F.linear(x.to(dtype), weight, bias).split([m.out_features for m in linears], dim=-1))


class FusedLinears:
    """The concatenated weight [sum(out), in] (and bias) of several nn.Linear, and how to split its output.

    The fused tensors are non-persistent buffers of `owner` (named `{name}_weight`, `{name}_bias`), so
    `.to()` / `.cuda()` / dtype casts move them with the model and state_dict() keeps the released names.
    A cast after fusing converts the views and the buffer separately: values stay equal, storage is no longer
    shared (fuse after placing the model to keep the memory saving)."""

    def __init__(self, owner: nn.Module, name: str, linears: list[nn.Linear], *, row_multiple: int = 1):
        """row_multiple > 1 pads each projection's rows with zeros up to a multiple (the padded outputs are 0):
        cuBLAS takes its slow 2-element-aligned kernels when a row length is not a multiple of 8 (the vision
        MLP's 3420), so `project` returns the padded layout and `__call__` the real columns."""
        self.sizes = [lin.out_features for lin in linears]
        self.padded_sizes = [-(-n // row_multiple) * row_multiple for n in self.sizes]
        ref = linears[0].weight
        has_bias = [lin.bias is not None for lin in linears]
        assert all(has_bias) or not any(has_bias), "fuse only projections that all have (or lack) a bias"
        with torch.no_grad():
            weight = ref.new_zeros(sum(self.padded_sizes), ref.shape[1])
            bias = ref.new_zeros(sum(self.padded_sizes)) if all(has_bias) else None
            off = 0
            for lin, n, p in zip(linears, self.sizes, self.padded_sizes):
                weight[off : off + n] = lin.weight
                if bias is not None:
                    bias[off : off + n] = lin.bias
                off += p
        self.owner, self.name = owner, name
        owner.register_buffer(f"{name}_weight", weight, persistent=False)
        owner.register_buffer(f"{name}_bias", bias, persistent=False)
        off = 0
        for lin, n, p in zip(linears, self.sizes, self.padded_sizes):
            lin.weight = nn.Parameter(weight[off : off + n], requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias[off : off + n], requires_grad=False)
            off += p

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, f"{self.name}_weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.owner, f"{self.name}_bias")

    def project(self, x: torch.Tensor, *, backend: str = "torch") -> torch.Tensor:
        """The fused output [..., sum(out)]."""
        return linear(x, self.weight, self.bias, backend=backend)

    def __call__(self, x: torch.Tensor, *, backend: str = "torch") -> list[torch.Tensor]:
        parts = self.project(x, backend=backend).split(self.padded_sizes, dim=-1)
        return [p[..., :n] if n != pn else p for p, n, pn in zip(parts, self.sizes, self.padded_sizes)]


def pad_input_columns(owner: nn.Module, name: str, lin: nn.Linear, multiple: int) -> torch.Tensor:
    """The weight of `lin` with its input columns zero-padded to a multiple (a non-persistent buffer of
    `owner` named `name`); lin.weight becomes a view of it (same values and name, no extra memory). For a
    projection that reads a padded FusedLinears output."""
    n = lin.in_features
    padded = -(-n // multiple) * multiple
    with torch.no_grad():
        w = lin.weight.new_zeros(lin.out_features, padded)
        w[:, :n] = lin.weight
    owner.register_buffer(name, w, persistent=False)
    lin.weight = nn.Parameter(w[:, :n], requires_grad=False)
    return w
