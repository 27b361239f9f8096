"""A fingerprint of weights: exact whatever the device or thread count, cheap enough to take at every start.

Each tensor's bit patterns are summed as integers (all of them, and every 7th), in chunks so the int64
temporaries stay small; integer sums do not depend on the reduction order. Two fine-tunes of one model differ
(their trained tensors do), and so does one checkpoint loaded in two dtypes.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_fingerprint(named: Iterable[tuple[str, torch.Tensor]], prefix: str = "") -> str:
    """32 hex digits over `prefix` and the tensors, taken in name order (the names order them; a saved stream's
    model identity is this over the config and every parameter, so the format stays as it is)."""
    h = hashlib.sha256(prefix.encode())
    for _, p in sorted(named, key=lambda kv: kv[0]):
        bits = p.detach().reshape(-1).view(_BITS[p.element_size()])
        stats = [sum(int(c.sum(dtype=torch.int64)) for c in x.split(1 << 24)) for x in (bits, bits[::7])]
        h.update(f"{p.dtype}:{stats[0]}:{stats[1]};".encode())
    return h.hexdigest()[:32]
