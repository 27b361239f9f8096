"""The stream frame's sliding-window attention kernel (ops/swa_fast.block_attention) on its own, 4B shape
(16 query heads, 2 kv heads, head dim 128, window 8192: a full ring of 8191 slots), a block of --tokens tokens
per row (256: a 448x448 frame; 1024: a clip of 4 frames).

    python benchmarks/bench_block_attention.py --batch 1 32 --splits 0 8 16
    python benchmarks/bench_block_attention.py --batch 1 --tokens 256 1024 2048 --splits 0 --sdpa

Each split count of the key range (0: the kernel's own choice) is checked against a float32 SDPA reference over
the ring concatenated with the block (ops/swa.py) first, then timed with CUDA events (warm-up, median of --reps
calls). --sdpa also times what the layer runs for blocks above BLOCK_PREFILL_MAX_T: the ring concatenated with
the block, the window mask and SDPA in bf16. Each is timed as replays of a CUDA graph (as in a stream's step: no
host launch time). Prints one JSON line per batch size and block length.
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
from infinitevl.ops import swa, swa_fast  # noqa: E402


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


def captured(fn):
    """fn as CUDA-graph replays; as plain calls (with a note) where it cannot be captured."""
    try:
        return CapturedStep(fn)
    except Exception as e:  # noqa: BLE001 (a host sync inside fn)
        print(f"(timed eagerly: {type(e).__name__}: {str(e)[:120]})", flush=True)
        torch.cuda.synchronize()
        return fn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="*", default=[1, 32])
    p.add_argument("--splits", type=int, nargs="*", default=[0, 8, 16])
    p.add_argument("--tokens", type=int, nargs="*", default=[256], help="block lengths T")
    p.add_argument("--sdpa", action="store_true", help="also time the SDPA path over cat([ring, block])")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    dev = torch.device("cuda")
    for B, T in [(B, T) for B in args.batch for T in args.tokens]:
        a, kw = inputs(B, T)
        T, H, D = a[0].shape[1:]
        flops = 4 * B * T * H * D * (a[4].shape[1] + T / 2)
        q, kn, vn, tok, keys, values, ridx = a
        kidx = torch.cat([ridx, tok], 1)
        mask = swa.window_mask(tok, kidx, kw["window"], k_valid_BS=kidx >= 0)
        want = swa.sliding_window_attention(q.float(), torch.cat([keys, kn], 1).float(),
                                            torch.cat([values, vn], 1).float(), mask, scale=kw["scale"])
        row = {"batch": B, "tokens": T}
        if args.sdpa:
            def sdpa():
                ki = torch.cat([ridx, tok], 1)
                m = swa.window_mask(tok, ki, kw["window"], k_valid_BS=ki >= 0)
                return swa.sliding_window_attention(q, torch.cat([keys, kn], 1), torch.cat([values, vn], 1), m,
                                                    scale=kw["scale"])
            err = ((sdpa().float() - want).norm() / want.norm()).item()
            ms = statistics.median(time_calls(captured(sdpa), args.reps, dev))
            row["sdpa_ms"], row["sdpa_tflops"], row["sdpa_relerr"] = ms, flops / ms / 1e9, err
            print(f"B={B} T={T} SDPA over cat: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, rel. err {err:.1e}",
                  flush=True)
        for ns in args.splits:
            run = lambda: swa_fast.block_attention(*a, **kw, num_splits=ns or None)  # noqa: E731
            err = ((run().float() - want).norm() / want.norm()).item()
            if err > 1e-2:
                raise SystemExit(f"B={B} T={T} splits {ns}: rel. error {err:.2e} against the float32 reference")
            ms = statistics.median(time_calls(captured(run), args.reps, dev))
            row[f"splits{ns}_ms"], row[f"splits{ns}_tflops"], row[f"splits{ns}_relerr"] = ms, flops / ms / 1e9, err
            print(f"B={B} T={T} splits {ns or 'auto'}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, rel. err {err:.1e}",
                  flush=True)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
