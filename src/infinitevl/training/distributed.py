"""One entry point for 1 CPU process, 1 GPU or N GPUs: torchrun's environment decides.

Under torchrun (WORLD_SIZE > 1) the process group starts with NCCL on GPUs and gloo on CPU, and the
trained module is wrapped with DDP or FSDP2 (`fully_shard` per decoder layer, then the root).
Nothing here is hand-written collective logic beyond summing a few scalars.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> Dist:
    """Reads torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process group when needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device is 'cuda' but no GPU is visible: use device: cpu or auto")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        from ..model.infinitevl import check_device

        try:
            dev = check_device(device)
        except ValueError as e:
            raise ValueError(f"run.device: {e}") from None
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, d: Dist, strategy: str, shard_units: list[nn.Module]) -> nn.Module:
    """DDP or FSDP2 around `module` (a no-op in one process). `shard_units` are the submodules FSDP2
    shards one by one (the decoder layers); whatever is left is sharded with the root."""
    if not d.enabled or strategy == "none":
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.local_rank] if d.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=False)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in shard_units:
            if any(p.requires_grad for p in unit.parameters()):
                fully_shard(unit)
        fully_shard(module)
        return module
    raise ValueError(f"run.parallel must be 'auto', 'none', 'ddp' or 'fsdp', got {strategy!r}")


def all_sum(x: float, d: Dist) -> float:
    if not d.enabled:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def no_sync(module: nn.Module, last: bool):
    """Context that skips the gradient all-reduce on all but the last micro-batch of a step."""
    import contextlib

    if last:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


class _fsdp_no_sync:
    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)
