"""A GDN layer's q/k/v short convs in training, 4B shape (q, k 2048 channels, v 4096, kernel 4), read from strided
slices of one fused projection output as in the layer: ops/short_conv_train.short_conv against fla's causal_conv1d
(what the layer ran before), each called once per conv.

    python benchmarks/bench_train_conv.py --tokens 16384 --samples 8

A packed row of --tokens tokens holding --samples equal samples (cu_seqlens), bf16 inputs, float32 weights as in
training under autocast. Both paths are checked against the float32 reference (ops/short_conv.py: outputs, input
and weight gradients) first, then timed: the forward alone
and forward + backward, as GPU kernel time (the profiler's sum: fla's host-side work per call is out of it) and as
wall time (CUDA events, median). The fwd+bwd figures include autograd's copy of the three input gradients into the
fused projection's gradient (the same for both paths). Prints one line per path and tile, then a JSON line.
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

require(__doc__, "triton", "fla")

from bench_inference import time_calls  # noqa: E402
from fla.modules.causal_conv1d import causal_conv1d  # noqa: E402
from infinitevl.ops import short_conv, short_conv_train  # noqa: E402


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def kernel_ms(fn, reps: int) -> float:
    """GPU kernel time of one call (the profiler's sum over `reps` calls / reps): the host's launch time is out."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--fwd-tiles", nargs="*", default=["32,128,4", "16,128,4", "32,256,8"],
                   help="forward tiles: tokens,channels,warps")
    p.add_argument("--dpre-tiles", nargs="*", default=["16,128,4,16", "16,128,4,8", "32,64,4,8", "16,64,4,16",
                                                       "32,128,8,8", "8,128,4,16", "16,256,8,8", "32,64,4,16"],
                   help="the backward's first kernel: tokens,channels,warps,token blocks per program")
    p.add_argument("--dx-tiles", nargs="*", default=["32,128,4", "16,128,4"],
                   help="the backward's second kernel: tokens,channels,warps")
    args = p.parse_args()
    dev, W, T = torch.device("cuda"), 4, args.tokens
    Cs = (2048, 2048, 4096)
    g = torch.Generator(device=dev).manual_seed(0)
    cu = torch.linspace(0, T, args.samples + 1, device=dev).round().to(torch.int32)
    fused = torch.randn(1, T, sum(Cs) + 4096 + 32, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    xs = list(fused[..., :sum(Cs)].split(Cs, -1))
    ws = [(torch.randn(C, W, device=dev, generator=g) * 0.5).requires_grad_() for C in Cs]
    dys = [torch.randn(1, T, C, device=dev, dtype=torch.bfloat16, generator=g) for C in Cs]
    leaves = [fused] + ws

    def backward(ys):
        for t in leaves:
            t.grad = None
        torch.autograd.backward(ys, dys)

    cu_long = cu.long()

    def fla_convs():
        return [causal_conv1d(x=x, weight=w, activation="silu", cu_seqlens=cu_long)[0] for x, w in zip(xs, ws)]

    def ours():
        starts = short_conv_train.seq_starts(cu, T, dev)
        return [short_conv_train.short_conv(x, w, starts_T=starts) for x, w in zip(xs, ws)]

    backward([short_conv.short_conv_packed(x.float(), w, cu) for x, w in zip(xs, ws)])
    ref = [t.grad.clone() for t in leaves]
    ref_y = [short_conv.short_conv_packed(x.float(), w, cu) for x, w in zip(xs, ws)]
    nbytes_fwd = 2 * 2 * T * sum(Cs)  # x read, y written (bf16)
    nbytes_bwd = 3 * 2 * T * sum(Cs)  # x and dy read, dx written
    row = {"bench": "train_conv", "device": torch.cuda.get_device_name(), "tokens": T, "samples": args.samples}
    mod = short_conv_train
    default = (mod.FWD_TILE, mod.DPRE_TILE, mod.DX_TILE)

    def tile(t):
        return tuple(int(v) for v in t.split(","))

    paths = [("fla x3", None, fla_convs), ("short_conv, default tiles", default, ours)]
    paths += [(f"short_conv fwd {t}", (tile(t),) + default[1:], ours) for t in args.fwd_tiles]
    paths += [(f"short_conv dpre {t}", (default[0], tile(t), default[2]), ours) for t in args.dpre_tiles]
    paths += [(f"short_conv dx {t}", default[:2] + (tile(t),), ours) for t in args.dx_tiles]
    for name, tiles, fn in paths:
        if tiles is not None:
            mod.FWD_TILE, mod.DPRE_TILE, mod.DX_TILE = tiles
        try:
            with torch.no_grad():
                ys = fn()
            backward(fn())
        except Exception as e:  # a tile that does not compile: the next one
            print(f"{name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        err = max([rel(y.float(), r) for y, r in zip(ys, ref_y)] + [rel(t.grad, r) for t, r in zip(leaves, ref)])
        if err > 2e-2:
            raise SystemExit(f"{name}: relative error {err:.2e} against the reference")
        with torch.no_grad():
            fwd = kernel_ms(fn, args.reps)
        both = kernel_ms(lambda: backward(fn()), args.reps)
        wall = statistics.median(time_calls(lambda: backward(fn()), args.reps, dev))
        row[name] = {"fwd_kernel_ms": fwd, "fwd_bwd_kernel_ms": both, "fwd_bwd_wall_ms": wall, "rel_err": err}
        print(f"{name:34s} kernels: fwd {fwd:.3f} ms ({nbytes_fwd / fwd / 1e9:.2f} TB/s), fwd+bwd {both:.3f} ms "
              f"(rest ~{nbytes_bwd / max(both - fwd, 1e-6) / 1e9:.2f} TB/s); wall fwd+bwd {wall:.3f} ms; "
              f"rel err {err:.1e}", flush=True)
    mod.FWD_TILE, mod.DPRE_TILE, mod.DX_TILE = default
    from torch.profiler import ProfilerActivity, profile

    for name, fn in (("fla x3", fla_convs), ("short_conv, default tiles", ours)):
        print(f"kernels of one forward + backward, {name}:", flush=True)
        backward(fn())
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            backward(fn())
            torch.cuda.synchronize()
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
            print(f"  {e.device_time_total / 1e3:8.3f} ms  {e.count:3d}x  {e.key[:90]}", flush=True)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
