"""Where a stream's frame step spends its time: per-kernel GPU time of the vision tower (+ merger) and of the
LLM prefill of one frame's tokens, 4B shape, random bf16 weights, at several stream counts.

    python benchmarks/profile_stream.py --streams 1 32 --out out/profile_stream

For each stream count: the captured (CUDA graph) time of each part, then an eager profiled run of each with the
top kernels by total GPU time (the sum of kernel time against the graph time shows how much is gaps).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_only import require  # noqa: E402

require(__doc__)

from bench_inference import time_calls  # noqa: E402
from bench_stream import build, frame_parts  # noqa: E402
from infinitevl.inference.cuda_graph import CapturedStep  # noqa: E402
from infinitevl.inference.frames import FrameSpec  # noqa: E402


def graph_ms(fn, device, reps: int = 20) -> float:
    return statistics.median(time_calls(CapturedStep(fn), reps, device))


def kernel_table(fn, n: int) -> tuple[float, str]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            rows.setdefault(e.name, []).append(e.device_time / 1e3)
    total = sum(sum(v) for v in rows.values())
    calls = sum(len(v) for v in rows.values())
    lines = [f"{calls} kernels in the step", f"{'ms':>8} {'%':>5} {'calls':>5}  kernel"]
    for name, ts in sorted(rows.items(), key=lambda kv: -sum(kv[1]))[:n]:
        lines.append(f"{sum(ts):8.3f} {100 * sum(ts) / total:5.1f} {len(ts):5d}  {name[:110]}")
    return total, "\n".join(lines)


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--streams", type=int, nargs="*", default=[1, 32])
    p.add_argument("--frame-size", type=int, default=448)
    p.add_argument("--top", type=int, default=22)
    p.add_argument("--frames-per-step", type=int, default=1,
                   help="K frames of each stream a step (push_clip): K * streams frames through the vision tower, "
                        "K frames' tokens per row through the LLM")
    p.add_argument("--out", type=Path, default=Path("out/profile_stream"))
    p.add_argument("--swa-block-prefill", type=int, nargs="*", default=[0],
                   help="values of ops.swa_fast.BLOCK_PREFILL_MAX_T to profile (0 = SDPA over the ring; 512 = the "
                        "block kernel for a 256-token frame)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build(False, dev, torch.bfloat16)
    model.set_backend("auto", vision=True)  # what a StreamSession sets up
    model.fuse_projections(vision=True)
    spec = FrameSpec(height=args.frame_size, width=args.frame_size)
    report = []
    from infinitevl.ops import swa_fast

    for B, block in [(B, blk) for B in args.streams for blk in args.swa_block_prefill]:
        swa_fast.BLOCK_PREFILL_MAX_T = block
        K = args.frames_per_step
        frames = torch.randint(0, 256, (B, K, args.frame_size, args.frame_size, 3), dtype=torch.uint8, device=dev)
        vision, llm, _ = frame_parts(model, spec, frames if K > 1 else frames[:, 0])

        for name, fn in (("vision", vision), ("llm", llm)):
            if name == "vision" and block != args.swa_block_prefill[0]:
                continue  # the vision tower does not depend on the SWA kernel
            g = graph_ms(fn, dev)
            total, txt = kernel_table(fn, args.top)
            head = (f"== B={B} K={K} {name} (swa block prefill max T {block}): graph {g:.2f} ms/step "
                    f"({g / B / K:.2f} ms/frame), "
                    f"eager kernel time {total:.2f} ms (gaps in the graph {g - total:+.2f} ms)")
            print(head + "\n" + txt, flush=True)
            report.append(head + "\n" + txt)
        del vision, llm
        torch.cuda.empty_cache()
    (args.out / "profile_stream.txt").write_text("\n\n".join(report) + "\n")


if __name__ == "__main__":
    main()
