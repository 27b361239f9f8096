"""GDN's q/k/v short convs of a stream step (ops/short_conv_fast.short_conv_chunk3) on their own, 4B shape
(q, k 2048 channels, v 4096, kernel 4), read from strided slices of one fused projection as in the layer, for
several program tiles (tokens, channels, warps).

    python benchmarks/bench_short_conv.py --tokens 256 2048

Each tile is checked against the plain-PyTorch reference (ops/short_conv.py) first (outputs and the advanced
states), then timed with CUDA events (median of --reps replays of a CUDA graph of --inner launches, so the host's launch time is out of it). Prints one line per tile
with the achieved bandwidth (bytes read and written once) and one JSON line per block length.
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
from gpu_only import require  # noqa: E402

require(__doc__, "triton")

from bench_inference import time_calls  # noqa: E402
from infinitevl.inference.cuda_graph import CapturedStep  # noqa: E402
from infinitevl.ops import short_conv, short_conv_fast  # noqa: E402

TILES = [(32, 128, 4), (16, 128, 4), (16, 128, 2), (32, 64, 2), (64, 128, 4), (64, 64, 4), (32, 256, 8), (16, 256, 4),
         (8, 256, 4)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="*", default=[256, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--inner", type=int, default=50, help="launches per timed call")
    args = p.parse_args()
    dev, dt, W = torch.device("cuda"), torch.bfloat16, 4
    Cs = (2048, 2048, 4096)
    g = torch.Generator(device=dev).manual_seed(0)
    for T in args.tokens:
        B = args.batch
        fused = torch.randn(B, T, sum(Cs) + 64, device=dev, dtype=dt, generator=g)  # + the gates' columns
        xs = list(fused[..., :sum(Cs)].split(Cs, -1))
        ws = [torch.randn(C, W, device=dev, dtype=dt, generator=g) for C in Cs]
        s0 = [torch.randn(B, C, W - 1, device=dev, dtype=dt, generator=g) for C in Cs]
        want = [short_conv.short_conv(x, w, state_BCW=s) for x, w, s in zip(xs, ws, s0)]
        nbytes = 2 * 2 * B * T * sum(Cs)
        row = {"tokens": T, "batch": B}
        for tile in TILES:
            states = [s.clone() for s in s0]
            try:
                ys = short_conv_fast.short_conv_chunk3(xs, ws, states, tile=tile)
            except Exception as e:  # a tile that does not compile (shared memory, registers): the next one
                print(f"T={T} tile {tile}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            err = max(max(((y.float() - wy.float()).abs().max().item(), (s - ws_.to(s.dtype)).abs().max().item()))
                      for y, s, (wy, ws_) in zip(ys, states, want))
            if err > 0.07:
                raise SystemExit(f"T={T} tile {tile}: max error {err:.2e} against the reference")
            states = [s.clone() for s in s0]

            def run():
                for _ in range(args.inner):
                    short_conv_fast.short_conv_chunk3(xs, ws, states, tile=tile)

            ms = statistics.median(time_calls(CapturedStep(run), args.reps, dev)) / args.inner
            row[str(tile)] = ms
            print(f"T={T} tile {tile}: {ms * 1e3:.1f} us, {nbytes / ms / 1e9:.2f} TB/s, max err {err:.1e}",
                  flush=True)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
