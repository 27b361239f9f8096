"""Probe: what FP8 (e4m3, per-row activation and per-channel weight scales, torch._scaled_mm) would save in a
streaming frame step at the 4B shape, before building it. Times every GEMM of one frame step, bf16 vs fp8
including the activation quantization (a one-pass Triton row kernel), at batch 1 and 32 frames of 448x448.

    python benchmarks/probe_fp8.py          # H100: a table, then one JSON line
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_only import require  # noqa: E402

require(__doc__, "triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

E4M3_MAX = 448.0


@triton.jit
def _quant_rows(x_ptr, q_ptr, s_ptr, K, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride + offs, mask=offs < K, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
    tl.store(q_ptr + row * K + offs, (x / scale).to(q_ptr.dtype.element_ty), mask=offs < K)
    tl.store(s_ptr + row, scale)


def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    q = torch.empty(M, K, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    _quant_rows[(M,)](x, q, s, K, x.stride(0), BLOCK=triton.next_power_of_2(K), num_warps=8)
    return q, s


def quant_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = (w.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / E4M3_MAX)
    return (w.float() / s).to(torch.float8_e4m3fn), s.t().contiguous()  # [N, K], scale [1, N]


def fp8_linear(x, wq, ws, bias):
    xq, xs = quant_rows(x)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, bias=bias, out_dtype=torch.bfloat16)


def time_ms(fn, iters=50) -> float:
    for _ in range(5):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ev)[iters // 2]


# (name, in K, out N, calls per frame step, bias) at the 4B shape (fused projections, vision MLP padded to 3456)
LLM = [("gdn in_proj", 2048, 12320, 27, False), ("gdn o_proj", 4096, 2048, 27, False),
       ("swa qkv", 2048, 2560, 9, True), ("swa o_proj", 2048, 2048, 9, False),
       ("mlp gate_up", 2048, 22016, 36, False), ("mlp down", 11008, 2048, 36, False)]
VISION = [("vit qkv", 1280, 3840, 32, True), ("vit proj", 1280, 1280, 32, True),
          ("vit gate_up", 1280, 6912, 32, True), ("vit down", 3456, 1280, 32, True),
          ("merger fc1", 5120, 5120, 1, True), ("merger fc2", 5120, 2048, 1, True)]


def main():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows, totals = [], {}
    for batch in (1, 32):
        for part, shapes, tokens in (("llm", LLM, 256), ("vision", VISION, 1024)):
            for name, K, N, calls, has_bias in shapes:
                M = batch * tokens if name[:6] != "merger" else batch * 256
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K**0.5
                bias = torch.randn(N, device=dev, dtype=torch.bfloat16) if has_bias else None
                wq, ws = quant_weight(w)
                ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
                got = fp8_linear(x, wq, ws, bias).float()
                rel = ((got - ref).norm() / ref.norm()).item()
                assert rel < 0.05, (name, rel)
                t_bf16 = time_ms(lambda: torch.nn.functional.linear(x, w, bias))
                t_fp8 = time_ms(lambda: fp8_linear(x, wq, ws, bias))
                xq, xs = quant_rows(x)
                t_mm = time_ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, bias=bias,
                                                        out_dtype=torch.bfloat16))
                rows.append(dict(batch=batch, part=part, name=name, M=M, K=K, N=N, calls=calls, rel_err=rel,
                                 bf16_ms=t_bf16, fp8_ms=t_fp8, fp8_mm_only_ms=t_mm,
                                 bf16_tflops=2 * M * K * N / t_bf16 / 1e9, fp8_tflops=2 * M * K * N / t_mm / 1e9))
                key = (batch, part)
                b, f, m = totals.get(key, (0.0, 0.0, 0.0))
                totals[key] = (b + calls * t_bf16, f + calls * t_fp8, m + calls * t_mm)
    print(f"{'B':>3} {'gemm':<12} {'M':>6} {'K':>6} {'N':>6} {'bf16 ms':>8} {'fp8 ms':>8} {'mm only':>8} "
          f"{'bf16 TF':>8} {'fp8 TF':>8} {'rel err':>8}")
    for r in rows:
        print(f"{r['batch']:>3} {r['name']:<12} {r['M']:>6} {r['K']:>6} {r['N']:>6} {r['bf16_ms']:>8.4f} "
              f"{r['fp8_ms']:>8.4f} {r['fp8_mm_only_ms']:>8.4f} {r['bf16_tflops']:>8.0f} {r['fp8_tflops']:>8.0f} "
              f"{r['rel_err']:>8.1e}")
    print("per frame step (all GEMMs, calls x median):")
    for (batch, part), (b, f, m) in totals.items():
        print(f"  batch {batch:>2} {part:<6}: bf16 {b:7.2f} ms   fp8 {f:7.2f} ms (GEMM alone {m:7.2f})")
    print(json.dumps({"bench": "probe_fp8", "device": torch.cuda.get_device_name(),
                      "totals_ms": {f"b{b}_{p}": dict(bf16=round(x, 3), fp8=round(y, 3), fp8_mm=round(z, 3))
                                    for (b, p), (x, y, z) in totals.items()}, "gemms": rows}))


if __name__ == "__main__":
    main()
