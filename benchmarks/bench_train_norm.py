"""The backward of training's residual add + RMSNorm, 4B shape (D 2048, a float32 stream, bf16 norm output and update):
ops/rms_norm_train.rms_norm_backward against fla's layer_norm_bwd (what training used before), frozen norm weight.

    python benchmarks/bench_train_norm.py --tokens 16384 --tiles 4,8,8 2,16,4

Both are checked against the float64 formula first (dx), then timed as GPU kernel time (the profiler's sum over
--reps calls). Bandwidth counts the bytes the backward must move: s, ds (float32) and dy (bf16) read, dx (float32)
and its bf16 copy written. Prints a line per path and tile, then a JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_only import require  # noqa: E402

require(__doc__, "triton", "fla")

from bench_train_conv import kernel_ms, rel  # noqa: E402
from infinitevl.ops import rms_norm_train  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tiles", nargs="*", default=["1,1,4", "1,1,8", "2,1,8", "4,1,8", "4,1,16", "1,4,4", "2,4,8",
                                                 "4,8,8", "1,16,4", "8,1,16", "2,2,4", "1,8,8"],
                   help="rows per block, blocks per program, warps (the default is timed too)")
    args = p.parse_args()
    from fla.modules.norm.layernorm import layer_norm_bwd

    dev, N, D, eps = torch.device("cuda"), args.tokens, args.dim, 1e-6
    g = torch.Generator(device=dev).manual_seed(0)
    s = torch.randn(N, D, device=dev, generator=g) * 2
    w = torch.rand(D, device=dev, generator=g) + 0.5
    dy = torch.randn(N, D, device=dev, generator=g).to(torch.bfloat16)
    ds = torch.randn(N, D, device=dev, generator=g)
    rstd = torch.rsqrt(s.pow(2).mean(-1) + eps)
    s64 = s.double().requires_grad_()
    (w.double() * s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps) * dy.double()).sum().backward()
    ref = s64.grad + ds.double()
    del s64

    def fla_path():
        dh, _, _, dx = layer_norm_bwd(dy, s, w, None, rstd=rstd, dres=ds, has_residual=True, is_rms_norm=True,
                                      x_dtype=torch.bfloat16)
        return dx

    def ours():
        return rms_norm_train.rms_norm_backward(dy, s, w, rstd, ds=ds, h_dtype=torch.bfloat16, need_dw=False)[0]

    default = rms_norm_train.TILE
    tiles = [default] + [t for t in (tuple(int(v) for v in x.split(",")) for x in args.tiles) if t != default]
    row = {"bench": "train_norm_bwd", "device": torch.cuda.get_device_name(), "tokens": N, "dim": D}
    nbytes = N * D * (4 + 4 + 2 + 4 + 2)
    for name, tile, fn in [("fla layer_norm_bwd", None, fla_path)] + [(f"rms_norm_backward {t}", t, ours)
                                                                         for t in tiles]:
        if tile is not None:
            rms_norm_train.TILE = tile
        try:
            err = rel(fn(), ref)
        except Exception as e:  # a tile that does not compile: the next one
            print(f"{name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        if err > 1e-2:  # fla's dx arrives in bf16
            raise SystemExit(f"{name}: relative error {err:.2e} against the formula")
        ms = kernel_ms(fn, args.reps)
        row[name] = {"kernel_ms": round(ms, 4), "rel_err": err}
        print(f"{name:34s} {ms:.3f} ms ({nbytes / ms / 1e9:.2f} TB/s), rel err {err:.1e}", flush=True)
    rms_norm_train.TILE = default
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
