"""Which kernels run: the plain-PyTorch references ("torch") or the fast GPU paths ("fla").

"fla" means: flash-linear-attention's Triton kernels for the gated delta rule (and the short conv's prefill),
our own Triton kernels for the small fused ops (short-conv decode step and training conv, RMSNorms, GDN gates), and
PyTorch SDPA / a copy-free ring-buffer read for sliding-window attention. It needs a CUDA device,
Triton and the `gpu` extra (`pip install infinitevl[gpu]`). The references stay the ground truth.

The choice is made once per model (`InfiniteVL.set_backend`), never inside a hot loop.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch

BACKENDS = ("auto", "torch", "fla")
log = logging.getLogger("infinitevl")


def fla_available() -> tuple[bool, str]:
    """(usable, why not) for the fast path on this machine."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    for mod, pkg in (("triton", "triton"), ("fla", "flash-linear-attention (pip install infinitevl[gpu])")):
        if importlib.util.find_spec(mod) is None:
            return False, f"{pkg} is not installed"
    return True, ""


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' -> 'fla' on a CUDA device with the fast kernels installed, else 'torch'.
    Forcing 'fla' where it cannot run is an error that names the remedy."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    ok, why = fla_available()
    if backend == "auto":
        return "fla" if ok and device.type == "cuda" else "torch"
    if not ok:
        raise ValueError(f"backend='fla' cannot run here: {why}. Use backend='torch' (the reference) or 'auto'")
    if device.type != "cuda":
        raise ValueError(f"backend='fla' needs the model on a CUDA device, it is on {device}: move it with .cuda()")
    return "fla"


def launch_on(t: torch.Tensor):
    """Context for a Triton launch on t's GPU rather than the current one (nothing on CPU: compile-only checks)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
