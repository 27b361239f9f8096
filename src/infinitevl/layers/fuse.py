"""Fusion of sibling projections that read the same input into one matmul.

Inference (`FusedLinears`): at batch 1 a decode step is bound by reading the weights, and cuBLAS reads a 50 MB
matrix far closer to full bandwidth than six separate 0.07-17 MB ones (measured on H100: 1.2 TB/s for 2048x2048,
2.4 TB/s for 11008x2048). `FusedLinears` concatenates the weights into one tensor and rebinds each nn.Linear's
weight (and bias) as a view of it: no extra memory, parameter names and values unchanged.

Training (`project_concat`, `project_together`): the weights are concatenated in each forward instead, so the
parameters stay separate (optimizer, FSDP2, checkpoints see the released layout). Frozen siblings can share one
storage for the run (`share_frozen_storage`): their concatenation is then a view, not a copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


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


def _adjacent_view(ws: list[torch.Tensor]) -> torch.Tensor | None:
    """cat(ws) as a view when the tensors already lie one after another in one storage (`share_frozen_storage`),
    else None."""
    w0 = ws[0]
    off = w0.storage_offset()
    for w in ws:
        if (w.ndim != 2 or w.stride() != (w0.shape[1], 1) or w.dtype != w0.dtype or w.shape[1] != w0.shape[1]
                or w.untyped_storage().data_ptr() != w0.untyped_storage().data_ptr() or w.storage_offset() != off):
            return None
        off += w.numel()
    return w0.detach().as_strided((sum(w.shape[0] for w in ws), w0.shape[1]), (w0.shape[1], 1), w0.storage_offset())


def concat_weights(ws: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """cat([w.to(dtype) for w in ws]) along dim 0: a view when the weights are adjacent in one storage and
    already in `dtype`, else one copy that casts as it goes (float32 master weights are read once and the bf16
    concatenation written once, where a cast then a cat writes and reads a bf16 copy in between)."""
    if all(w.dtype == dtype for w in ws):
        view = _adjacent_view(ws)
        if view is not None:
            return view
    out = torch.empty((sum(w.shape[0] for w in ws), *ws[0].shape[1:]), dtype=dtype, device=ws[0].device)
    off = 0
    for w in ws:
        out[off : off + w.shape[0]].copy_(w.detach())
        off += w.shape[0]
    return out


def share_frozen_storage(module: nn.Module) -> list[list[nn.Linear]]:
    """Training: the frozen sibling projections of every layer (its `siblings()`: an MLP's gate and up with the
    MLP frozen) are rebound as adjacent views of one tensor, so `project_concat` takes their concatenation as a
    view instead of copying it in every forward, recompute and backward (at the 4B shape with frozen MLPs that
    copy is ~6.5 GB of traffic a pass). Values, parameter objects and names are unchanged (biases keep their own
    storage). Groups with a trained weight, a wrapped (LoRA) projection, mixed dtypes/devices, or weights that are
    already views of a larger tensor are left alone.
    Returns the groups; `unshare_storage` gives each weight its own storage again after the run."""
    groups = []
    for m in module.modules():
        siblings = getattr(m, "siblings", None)
        if siblings is None:
            continue
        lins = siblings()
        ws = [lin.weight for lin in lins]
        if (len(lins) < 2 or any(type(lin) is not nn.Linear for lin in lins)
                or any(w.requires_grad for w in ws) or len({(w.dtype, w.device, w.shape[1:]) for w in ws}) > 1
                or any(w.untyped_storage().nbytes() != w.numel() * w.element_size() for w in ws)):
            continue  # (the last: already views into a larger tensor, e.g. fused for inference by FusedLinears)
        with torch.no_grad():
            buf = torch.cat([w.detach() for w in ws])
        off = 0
        for lin in lins:
            n = lin.weight.shape[0]
            lin.weight.data = buf[off : off + n]
            off += n
        groups.append(lins)
    return groups


def unshare_storage(groups: list[list[nn.Linear]]) -> None:
    """Undoes `share_frozen_storage` for the groups whose weights still share one storage."""
    with torch.no_grad():
        for lins in groups:
            if _adjacent_view([lin.weight for lin in lins]) is not None:
                for lin in lins:
                    lin.weight.data = lin.weight.data.clone()


class _ConcatLinear(torch.autograd.Function):
    """x @ cat(weights)^T (+ cat(biases)) in `dtype`. Saves the weights themselves, not their concatenation:
    backward concatenates them again (a few milliseconds a step at the 4B shape), where autograd over
    torch.cat would keep the concatenated copy of every layer alive until backward (2.3 GiB more at the peak of
    a 4B training step with frozen MLPs, measured on an H200). Like F.linear it saves x only when a weight
    trains, the weights only when x does. Gradients: dx in x's dtype, each weight's and bias's in its own."""

    @staticmethod
    def forward(ctx, x, dtype, n_weights, *params):
        ws, bs = params[:n_weights], params[n_weights:]
        xc = x.to(dtype)
        weight = concat_weights(ws, dtype)
        y = F.linear(xc, weight, torch.cat([b.to(dtype) for b in bs]) if bs else None)
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[3 : 3 + n_weights])
        ctx.save_for_backward(xc if need_w else None, *(ws if need_x else (None,) * n_weights))
        ctx.dtype, ctx.x_dtype, ctx.n_biases = dtype, x.dtype, len(bs)
        ctx.sizes = [w.shape[0] for w in ws]
        ctx.param_dtypes = [p.dtype for p in params]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xc, *ws = ctx.saved_tensors
        n = len(ctx.sizes)
        needs = ctx.needs_input_grad[3:]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ concat_weights(ws, ctx.dtype)).to(ctx.x_dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = None if xc is None else xc.reshape(-1, xc.shape[-1])
        grads, off = [], 0
        dw_all = None
        if sum(needs[:n]) > 1:  # several weights train: one matmul for all, each gets its slice
            dw_all = dy2.t() @ x2
        for i, size in enumerate(ctx.sizes):
            g = None
            if needs[i]:
                g = dw_all[off : off + size] if dw_all is not None else dy2[:, off : off + size].t() @ x2
                g = g.to(ctx.param_dtypes[i])
            grads.append(g)
            off += size
        off = 0
        for i, size in enumerate(ctx.sizes[: ctx.n_biases]):
            grads.append(dy2[:, off : off + size].sum(0).to(ctx.param_dtypes[n + i]) if needs[n + i] else None)
            off += size
        return (dx, None, None, *grads)


def project_concat(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """Training: sibling projections of x as one matmul over their weights concatenated in this forward (cast
    first to the autocast dtype, as autocast would cast each): one [..., sum(out)] tensor, the projections'
    outputs side by side. Backward then computes dx in one matmul instead of one per projection plus the adds that
    sum them, and the weights' gradients in one matmul. Same values as the separate projections."""
    from ..ops.train_kernels import autocast_dtype

    if len({m.bias is None for m in linears}) > 1:
        raise ValueError("project_concat: the projections must all have a bias or none")
    dtype = autocast_dtype(x)
    weights = [m.weight for m in linears]
    biases = [] if linears[0].bias is None else [m.bias for m in linears]
    with torch.autocast(x.device.type, enabled=False):  # the dtype is explicit
        return _ConcatLinear.apply(x, dtype, len(weights), *weights, *biases)


def project_together(x: torch.Tensor, linears: list[nn.Linear]) -> list[torch.Tensor]:
    """`project_concat`, its output split into one view per projection."""
    return list(project_concat(x, linears).split([m.out_features for m in linears], dim=-1))


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
