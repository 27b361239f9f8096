"""The MLP's SwiGLU in training, 4B shape (hidden 11008): ops/swiglu_train (gate and up as the two halves of one
matmul output, `swiglu_packed`) against fla's SwiGLU on two tensors (what training ran before: gate and up from two
matmuls).

    python benchmarks/bench_train_swiglu.py --tokens 16384 --tiles 8,512,4 16,256,4

bf16 inputs as under autocast. Each path is checked against the float64 formula first (output and the input
gradient), then timed as GPU kernel time (the profiler's sum over --reps calls): the forward alone, and the backward
alone (forward + backward minus forward). Bandwidth counts the bytes each kernel must move (forward: gate and up
read, z written; backward: gate, up and dz read, both gradients written). Prints a line per path, then a JSON line.
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
from infinitevl.ops import swiglu_train  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=11008)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tiles", nargs="*", default=["8,512,4", "16,512,8", "4,1024,4", "16,256,4", "32,256,8",
                                                  "8,1024,8"], help="rows,columns,warps (the default is timed too)")
    args = p.parse_args()
    from fla.modules.activations.ops import swiglu as fla_swiglu

    dev, N, I = torch.device("cuda"), args.tokens, args.hidden
    g = torch.Generator(device=dev).manual_seed(0)
    gu = (torch.randn(N, 2 * I, device=dev, generator=g) * 3).to(torch.bfloat16).requires_grad_()
    dz = torch.randn(N, I, device=dev, dtype=torch.bfloat16, generator=g)
    g64, u64 = (t.detach().double().requires_grad_() for t in gu.split(I, -1))
    z64 = torch.nn.functional.silu(g64) * u64
    z64.backward(dz.double())
    ref_grad = torch.cat([g64.grad, u64.grad], -1)
    del g64, u64

    # before: gate and up came from two matmuls, two contiguous tensors
    gate, up = (t.detach().contiguous().requires_grad_() for t in gu.split(I, -1))

    def fla_path():
        return fla_swiglu(gate, up)

    def ours():
        return swiglu_train.swiglu_packed(gu)

    def fwd_bwd(fn):
        for t in (gu, gate, up):
            t.grad = None
        fn().backward(dz)

    def grad():
        return gu.grad if gu.grad is not None else torch.cat([gate.grad, up.grad], -1)

    default = swiglu_train.TILE
    tiles = [default] + [t for t in (tuple(int(v) for v in s.split(",")) for s in args.tiles) if t != default]
    paths = [("fla swiglu (gate, up)", None, fla_path)] + [(f"swiglu_packed {t}", t, ours) for t in tiles]
    row = {"bench": "train_swiglu", "device": torch.cuda.get_device_name(), "tokens": N, "hidden": I}
    fwd_bytes, bwd_bytes = 3 * 2 * N * I, 5 * 2 * N * I
    for name, tile, fn in paths:
        if tile is not None:
            swiglu_train.TILE = tile
        try:
            with torch.no_grad():
                z = fn()
            fwd_bwd(fn)
        except Exception as e:  # a tile that does not compile: the next one
            print(f"{name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        err = max(rel(z, z64), rel(grad(), ref_grad))
        if err > 1e-2:
            raise SystemExit(f"{name}: relative error {err:.2e} against the formula")
        with torch.no_grad():
            fwd = kernel_ms(fn, args.reps)
        both = kernel_ms(lambda: fwd_bwd(fn), args.reps)
        bwd = both - fwd
        row[name] = {"fwd_kernel_ms": round(fwd, 4), "bwd_kernel_ms": round(bwd, 4), "rel_err": err}
        print(f"{name:34s} fwd {fwd:.3f} ms ({fwd_bytes / fwd / 1e9:.2f} TB/s), bwd {bwd:.3f} ms "
              f"({bwd_bytes / bwd / 1e9:.2f} TB/s), rel err {err:.1e}", flush=True)
    swiglu_train.TILE = default
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
