"""The stream frame's sliding-window attention kernel (ops/swa_fast.block_attention) on its own, 4B shape
(16 query heads, 2 kv heads, head dim 128, window 8192: a full ring of 8191 slots), a 256-token frame per row.

    python benchmarks/bench_block_attention.py --batch 1 32 --kernels 1 2 3

Each kernel variant (swa_fast.BLOCK_KERNEL) is checked against variant 1 first, then timed with CUDA events
(warm-up, median of --reps calls). Prints one JSON line per batch size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import time_calls  # noqa: E402
from infinitevl.ops import swa_fast  # noqa: E402


def inputs(B, T=256, H=16, G=2, D=128, window=8192, seen=20000, device="cuda", dtype=torch.bfloat16):
    R = window - 1
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
    kn, vn = (torch.randn(B, T, G, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    keys, values = (torch.randn(B, R, G, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    toks = torch.arange(seen - R, seen, device=device)
    ridx = torch.empty(R, dtype=torch.long, device=device)
    ridx[toks % R] = toks
    tok = torch.arange(seen, seen + T, device=device).expand(B, T).contiguous()
    return (q, kn, vn, tok, keys, values, ridx.expand(B, R).contiguous()), dict(window=window, scale=D ** -0.5)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="*", default=[1, 32])
    p.add_argument("--kernels", type=int, nargs="*", default=[1, 2, 3])
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    dev = torch.device("cuda")
    for B in args.batch:
        a, kw = inputs(B)
        T, H, D = a[0].shape[1:]
        flops = 4 * B * T * H * D * (a[4].shape[1] + T / 2)
        row, ref = {"batch": B}, None
        for kern in args.kernels:
            swa_fast.BLOCK_KERNEL = kern
            o = swa_fast.block_attention(*a, **kw)
            ref = o if ref is None else ref
            err = (o.float() - ref.float()).abs().max().item()
            ms = statistics.median(time_calls(lambda: swa_fast.block_attention(*a, **kw), args.reps, dev))
            row[f"k{kern}_ms"], row[f"k{kern}_tflops"], row[f"k{kern}_maxdiff"] = ms, flops / ms / 1e9, err
            print(f"B={B} kernel {kern}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, max |diff| vs first {err:.2e}",
                  flush=True)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
