"""Where the time goes: per-kernel GPU time of a prefill chunk and of one decode step (4B shape, bf16).

    python benchmarks/profile_steps.py --chunk 8192 --out out/profile
Prints the top kernels by total GPU time for each, and the kernel count of a decode step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_only import require  # noqa: E402

require(__doc__)

from bench_inference import build_ours  # noqa: E402
from infinitevl.inference.engine import Engine  # noqa: E402


def top(prof, n=25) -> str:
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70)


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("out/profile"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    model = build_ours(False, dev, torch.bfloat16)
    engine = Engine(model, max_batch_size=args.batch)
    state = model.new_state(1)
    for i in range(args.chunks):
        ids = torch.randint(0, 150000, (1, args.chunk), device=dev)
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.prefill(ids, state=state, chunk_size=args.chunk)
        torch.cuda.synchronize()
        print(f"prefill chunk {i}: {time.perf_counter() - t:.3f} s", flush=True)
    ids = torch.randint(0, 150000, (1, args.chunk), device=dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.prefill(ids, state=state, chunk_size=args.chunk)
        torch.cuda.synchronize()
    txt = top(prof)
    print("PREFILL CHUNK\n" + txt, flush=True)
    (args.out / "prefill.txt").write_text(txt)

    dec = engine.begin(torch.randint(0, 150000, (args.batch, 64), device=dev))
    for _ in range(5):
        engine.step(dec)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        engine.step(dec)
    torch.cuda.synchronize()
    print(f"graph replay: {(time.perf_counter() - t) / 50 * 1e3:.3f} ms/step", flush=True)
    slot = dec.slot
    for _ in range(2):
        engine._step(slot, "greedy")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine._step(slot, "greedy")
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in events) / 1e3
    txt = top(prof, 40)
    print(f"DECODE STEP (eager): {len(events)} kernels, {total:.3f} ms of kernel time\n" + txt, flush=True)
    (args.out / "decode.txt").write_text(txt)


if __name__ == "__main__":
    main()
