"""Batch-1 projections of the 4B decoder: cuBLAS (F.linear) against ops/gemv.py, bf16, CUDA-graph timed.

    python benchmarks/bench_gemv.py
Prints us and achieved TB/s (weight bytes / time) per shape, and one JSON line.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_only import require  # noqa: E402

require(__doc__, "triton")
from infinitevl.ops.gemv import gemv  # noqa: E402

# (name, N, K): fused GDN in_proj, MLP gate|up, down, GDN o_proj, SWA qkv, SWA o, lm_head
SHAPES = [("gdn_in", 12320, 2048), ("gate_up", 22016, 2048), ("down", 2048, 11008), ("gdn_o", 2048, 4096),
          ("swa_qkv", 2560, 2048), ("swa_o", 2048, 2048), ("lm_head", 151936, 2048)]


def graph_time_us(fn, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return sorted(times)[2]


def main():
    out = {}
    print(f"{'shape':>8} {'N':>7} {'K':>6} | {'cuBLAS us':>9} {'TB/s':>5} | {'triton us':>9} {'TB/s':>5} | rel err")
    for name, N, K in SHAPES:
        # several weight copies so repeated calls do not hit L2 (50 MB on H100)
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(max(1, 200_000_000 // (N * K * 2)))]
        x = torch.randn(1, 1, K, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), ws[0].float())
        err = ((gemv(x, ws[0]).float() - ref).norm() / ref.norm()).item()
        i = [0]

        def run(f):
            def call():
                f(x, ws[i[0] % len(ws)])
                i[0] += 1
            return call

        t_cublas = graph_time_us(run(lambda x, w: F.linear(x, w)))
        t_triton = graph_time_us(run(gemv))
        gb = N * K * 2 / 1e9
        out[name] = dict(N=N, K=K, cublas_us=t_cublas, triton_us=t_triton, rel_err=err)
        print(f"{name:>8} {N:>7} {K:>6} | {t_cublas:>9.1f} {gb / t_cublas * 1e3:>5.2f} | {t_triton:>9.1f} "
              f"{gb / t_triton * 1e3:>5.2f} | {err:.1e}", flush=True)
    print(json.dumps(dict(bench="gemv", device=torch.cuda.get_device_name(), results=out)))


if __name__ == "__main__":
    main()
