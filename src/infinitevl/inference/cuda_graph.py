"""CUDA-graph capture of a step that reads and writes only preallocated tensors.

The captured function must have static shapes, no host syncs (`.item()`, `.tolist()`, data-dependent
Python branches) and no CPU tensors: replay re-runs exactly the recorded kernels on the same addresses.
Warm-up runs first on a side stream (Triton compiles, cuBLAS picks its kernels); it executes the
function for real, so the caller captures on buffers whose contents it resets afterwards.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class CapturedStep:
    def __init__(self, fn: Callable[[], None], *, warmup: int = 2, pool=None):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn()

    def __call__(self) -> None:
        self.graph.replay()


class EagerStep:
    """The same interface without a graph (CPU, or cuda_graph=False)."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn

    def __call__(self) -> None:
        self.fn()
