"""Can a stream's vision tower run beside the LLM? 4B shape, random bf16 weights: the vision part (frame ->
merger features) and the LLM part (a frame's tokens into the state) of a frame step, each captured alone, one
after the other in one graph, and forked onto two streams in one graph (vision on a side stream of lower or
equal priority). If the overlapped graph is much shorter than the sequential one, pipelining frames (vision of
frame t+1 beside the LLM of frame t) pays.

    python benchmarks/probe_overlap.py --streams 1 8 32
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

require(__doc__)

from bench_inference import time_calls  # noqa: E402
from bench_stream import build, frame_parts  # noqa: E402
from infinitevl.inference.cuda_graph import CapturedStep  # noqa: E402
from infinitevl.inference.frames import FrameSpec  # noqa: E402


def forked(first, second, side: torch.cuda.Stream):
    def run():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            second()
        first()
        torch.cuda.current_stream().wait_stream(side)
    return run


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--streams", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build(False, dev, torch.bfloat16)
    model.set_backend("auto", vision=True)
    model.fuse_projections(vision=True)
    spec = FrameSpec(height=448, width=448)
    lo, hi = torch.cuda.Stream.priority_range()
    for B in args.streams:
        frames = torch.randint(0, 256, (B, 448, 448, 3), dtype=torch.uint8, device=dev)
        vision, llm, _ = frame_parts(model, spec, frames)
        row = {"streams": B}
        variants = {
            "vision": vision, "llm": llm, "sequential": lambda: (vision(), llm()),
            "overlap_same_priority": forked(llm, vision, torch.cuda.Stream()),
            "overlap_llm_first": forked(llm, vision, torch.cuda.Stream(priority=lo)),
        }
        for name, fn in variants.items():
            if name == "overlap_llm_first":  # main stream at high priority, vision side stream at low
                with torch.cuda.stream(torch.cuda.Stream(priority=hi)):
                    step = CapturedStep(fn)
                    ms = statistics.median(time_calls(step, args.reps, dev))
            else:
                step = CapturedStep(fn)
                ms = statistics.median(time_calls(step, args.reps, dev))
            row[name + "_ms"] = round(ms, 3)
            print(f"B={B} {name}: {ms:.2f} ms/step, {1000 * B / ms:.1f} frames/s", flush=True)
            del step
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
