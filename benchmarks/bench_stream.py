"""Streaming benchmark: frames/s of StreamSession's captured frame step, InfiniteVL 4B shape (random bf16 weights).

    python benchmarks/bench_stream.py --out out/stream              # GPU: the full run (~4 min on an H100)
    python benchmarks/bench_stream.py --tiny --out out/stream-tiny  # CPU: tiny shapes, seconds

Synthetic frames (random uint8 on the host, as a decoder would hand them over; no PyAV needed). Order:
1. correctness gate: CUDA-graph replay == eager on a few frames (states and an answer) and the fast kernels
   against the reference kernels (eager, plain PyTorch);
2. single stream at --frame-size (448x448 = 256 visual tokens per frame) over --frames frames (10,000), FPS
   and GPU memory per window of --window frames (500), timed with CUDA events after a warm-up;
3. aggregate FPS with --streams concurrent streams (8 and 32): one batched replay per step, median of
   per-step CUDA-event times;
4. where the time goes: the vision tower (+ merger) and the LLM prefill captured separately.
Prints a table, writes results.json and stream.png under --out and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from infinitevl import InfiniteVL, preset  # noqa: E402
from infinitevl.inference.cuda_graph import CapturedStep, EagerStep  # noqa: E402
from infinitevl.inference.frames import FrameSpec, frames_to_tensor, preprocess_frames  # noqa: E402
from infinitevl.inference.streaming import StreamSession  # noqa: E402


class ByteTokenizer:
    """Just enough tokenizer for a session on random weights: UTF-8 bytes as ids 10..265, the vision tokens at the
    model config's ids, <|im_start|> and <|im_end|> at the top of the vocabulary."""

    VISION = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
              "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}

    def __init__(self, config):
        vocab = config.text.vocab_size
        self.special = {"<|im_start|>": vocab - 1, "<|im_end|>": vocab - 2}
        self.special.update({name: getattr(config, key) for name, key in self.VISION.items()})
        assert len(set(self.special.values())) == len(self.special) and min(self.special.values()) >= 266
        self.pattern = re.compile("(" + "|".join(re.escape(n) for n in self.special) + ")")

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        ids = []
        for part in self.pattern.split(text):
            ids.extend([self.special[part]] if part in self.special else [b + 10 for b in part.encode()])
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 10 for i in ids if 10 <= i < 266).decode(errors="replace")

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.special.get(token, -1)


# ---------------------------------------------------------------- helpers
def build(tiny: bool, device, dtype) -> InfiniteVL:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InfiniteVL(preset("tiny" if tiny else "4b"))
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def gpu_mem(device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30


class Clock:
    """CUDA events on the GPU (no sync until read), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.float(), y.float()
    return float((x - y).norm() / y.norm().clamp(min=1e-12))


def state_err(a, b) -> float:
    return max(rel_err(x, y) for x, y in zip(a.tensors(), b.tensors()) if x.dtype != torch.long)


def long_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()) if x.dtype == torch.long)


# ---------------------------------------------------------------- 1. gate
@torch.no_grad()
def gate(model, tok, spec, frames, device) -> dict:
    """Fast kernels against the reference kernels, judged against a float32 reference: the fast path's state
    error must stay within twice the reference kernels' own error at the run's dtype (+1e-3), since both round
    the same activations to bf16 through 36 random layers. Then graph replay == eager (same kernels)."""
    import copy

    res = {}
    n = len(frames)

    def states(m, backend, cuda_graph=False):
        s = StreamSession(m, tok, frame=spec, backend=backend, cuda_graph=cuda_graph)
        for i, f in enumerate(frames[:2]):
            s.push_frame(f, i * 0.5)
        return s

    hi = copy.deepcopy(model).float()
    ref_hi = states(hi, "torch").state.clone()
    del hi
    ref_state = states(model, "torch").state.clone()
    eager = states(model, "auto")
    res["fast_vs_float32_rel_err"] = state_err(eager.state, ref_hi)
    res["reference_vs_float32_rel_err"] = state_err(ref_state, ref_hi)
    res["fast_vs_reference_rel_err"] = state_err(eager.state, ref_state)
    res["fast_vs_reference_ok"] = (res["fast_vs_float32_rel_err"] <= 2 * res["reference_vs_float32_rel_err"] + 1e-3
                                   and long_equal(eager.state, ref_state))
    del ref_state, ref_hi
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for i, f in enumerate(frames[2:], start=2):
        eager.push_frame(f, i * 0.5)
    graph = StreamSession(model, tok, frame=spec, cuda_graph=device.type == "cuda")
    for i, f in enumerate(frames):
        graph.push_frame(f, i * 0.5)
    res["graph_vs_eager_rel_err"] = state_err(graph.state, eager.state)
    res["graph_vs_eager_ok"] = res["graph_vs_eager_rel_err"] < 1e-2 and long_equal(graph.state, eager.state)
    a, b = (s.ask("What is happening?", max_new_tokens=8) for s in (graph, eager))
    res["answers_equal"] = a == b
    res["frames"] = n
    res["passed"] = all(v for k, v in res.items() if isinstance(v, bool))
    return res


# ---------------------------------------------------------------- 2. single stream
@torch.no_grad()
def single_stream(model, tok, spec, pool, n_frames, window, warmup, device, *, budget_s=float("inf"),
                  cuda_graph=None, pipeline=None, clip=1) -> dict:
    """Stops early (at a window boundary, recorded) once `budget_s` seconds have passed. clip > 1: that many
    frames a step (`push_clip`); window and warmup are then multiples of it."""
    window = max(clip, window // clip * clip)  # whole clips per window and warm-up
    warmup = -(-warmup // clip) * clip
    n_frames = max(window, n_frames // window * window)
    session = StreamSession(model, tok, frame=spec, cuda_graph=cuda_graph, pipeline=pipeline)
    clock = Clock(device)
    clips = [np.stack([pool[(s + k) % len(pool)] for k in range(clip)]) for s in range(len(pool))]

    def push(i):  # frames i .. i + clip - 1
        if clip == 1:
            session.push_frame(pool[i % len(pool)], i * 0.5)
        else:
            session.push_clip(clips[(i // clip) % len(clips)], [(i + k) * 0.5 for k in range(clip)])

    for i in range(0, warmup, clip):
        push(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    windows, marks = [], [clock.mark()]
    t0 = time.perf_counter()
    for i in range(clip - 1, n_frames, clip):
        push(warmup + i - clip + 1)
        if (i + 1) % window == 0:
            marks.append(clock.mark())
            alloc, peak = gpu_mem(device)
            windows.append(dict(frames=i + 1, alloc_gib=alloc, peak_gib=peak))
            print(f"  {i + 1} frames, {window * 1e3 / clock.ms(marks[-2], marks[-1]):.1f} FPS, {alloc} GiB", flush=True)
            if time.perf_counter() - t0 > budget_s:
                break
    session.state  # noqa: B018 (finishes a pipelined last frame)
    sync(device)
    wall_s = time.perf_counter() - t0
    n_frames = windows[-1]["frames"]
    for w, a, b in zip(windows, marks[:-1], marks[1:]):
        w["fps"] = window * 1e3 / clock.ms(a, b)
    fps = [w["fps"] for w in windows]
    allocs = [w["alloc_gib"] for w in windows if w["alloc_gib"] is not None]
    return dict(frames=n_frames, window=window, windows=windows, fps_overall=n_frames / wall_s,
                fps_median_window=statistics.median(fps), fps_min_window=min(fps), fps_max_window=max(fps),
                flatness=max(fps) / min(fps), state_mib=session.memory_bytes() / 2**20,
                alloc_growth_gib=(max(allocs) - min(allocs)) if allocs else None,
                graphs=[list(k) for k in session.step.graphs], pipeline=session.step.pipeline, clip=clip)


# ---------------------------------------------------------------- 3. many streams
@torch.no_grad()
def many_streams(model, tok, spec, pool, B, steps, warmup, device, pipeline=None) -> dict:
    session = StreamSession(model, tok, frame=spec, batch_size=B, pipeline=pipeline)
    clock = Clock(device)
    batches = [np.stack([pool[(s + b) % len(pool)] for b in range(B)]) for s in range(4)]
    for s in range(warmup):
        session.push_frames(batches[s % 4], [s * 0.5] * B)
    sync(device)
    ms, t0 = [], time.perf_counter()
    for s in range(steps):
        a = clock.mark()
        session.push_frames(batches[s % 4], [(warmup + s) * 0.5] * B)
        ms.append((a, clock.mark()))
    session.state  # noqa: B018 (finishes a pipelined last step before the wall clock stops)
    sync(device)
    wall_s = time.perf_counter() - t0
    step_ms = statistics.median(clock.ms(a, b) for a, b in ms)
    alloc, peak = gpu_mem(device)
    return dict(streams=B, pipeline=session.step.pipeline, step_ms=step_ms, fps_aggregate=B * 1e3 / step_ms,
                fps_aggregate_wall=B * steps / wall_s, per_stream_fps=1e3 / step_ms, state_mib=session.memory_bytes() / 2**20, alloc_gib=alloc, peak_gib=peak)


# ---------------------------------------------------------------- 4. breakdown
def frame_parts(model, spec, frames):
    """The frame step's parts as callables on a fresh state of B streams (device frames [B, H, W, 3], or clips
    [B, K, H, W, 3]): the vision tower + merger alone, the LLM prefill of the frames' tokens alone (random
    embeddings), and the whole step."""
    from infinitevl.inference.frame_step import FrameStep

    device, B = frames.device, frames.shape[0]
    K = frames.shape[1] if frames.ndim == 5 else 1
    state = model.new_state(B)
    step = FrameStep(model, state, spec, cuda_graph=False)
    N = spec.tokens_per_frame * K
    x = torch.randn(B, N, model.config.text.hidden_size, device=device, dtype=model.lm_head.weight.dtype)
    pos = torch.arange(N, device=device)[None, None] + torch.zeros(3, B, 1, dtype=torch.long, device=device)

    def vision():
        pixels = preprocess_frames(frames.reshape(-1, *frames.shape[-3:]), spec, dtype=step.pixel_dtype,
                                   stats=step.stats)
        model.visual.forward_frames(pixels, step.layout)

    def llm():
        model.model(x, pos, state=state)
        state.seen.add_(N)

    return vision, llm, lambda: step.run(frames, pos[:, :, :1].expand(3, B, K) if K > 1 else pos[:, :, 0])


@torch.no_grad()
def breakdown(model, spec, pool, B, steps, device) -> dict:
    """ms per step for the vision tower (+ merger) alone and the LLM prefill alone, each captured."""
    frames = frames_to_tensor([pool[b % len(pool)] for b in range(B)]).to(device)
    vision, llm, whole = frame_parts(model, spec, frames)

    wrap = (lambda f: CapturedStep(f)) if device.type == "cuda" else EagerStep
    clock, out = Clock(device), {}
    for name, fn in (("vision_ms", vision), ("llm_ms", llm), ("frame_step_ms", whole)):
        run = wrap(fn)
        for _ in range(3):
            run()
        times = []
        for _ in range(steps):
            a = clock.mark()
            run()
            times.append(clock.ms(a, clock.mark()))
        out[name] = statistics.median(times)
    out["streams"] = B
    return out


# ---------------------------------------------------------------- report
def table(res) -> str:
    s = res["single"]
    lines = [f"device {res['device']}  backend {res['backend']}  frame {res['frame_size']}x{res['frame_size']} "
             f"({res['tokens_per_frame']} tokens/frame)",
             f"gate: {res['gate']}",
             f"single stream: {s['fps_median_window']:.1f} FPS median window, {s['fps_overall']:.1f} overall, "
             f"min/max window {s['fps_min_window']:.1f}/{s['fps_max_window']:.1f} (flatness {s['flatness']:.3f}), "
             f"state {s['state_mib']:.0f} MiB, alloc growth " + (
                 "n/a (no GPU)" if s['alloc_growth_gib'] is None else f"{s['alloc_growth_gib']} GiB")
             + f"; eager {res['single_eager_fps']:.1f} FPS",
             f"pipelined: {s['pipeline']}" + (f"; not pipelined: {res['single_sequential_fps']:.1f} FPS"
                                              if res.get("single_sequential_fps") is not None else ""),
             f"frames per step: {s['clip']} (headline); others: " + (", ".join(
                 f"{k}: {v:.1f} FPS" for k, v in res.get("single_by_clip", {}).items()) or "none measured"),
             "streams | step ms | aggregate FPS | per-stream FPS"]
    for r in res["many"]:
        lines.append(f"{r['streams']:>7} | {r['step_ms']:>7.2f} | {r['fps_aggregate']:>13.1f} | {r['per_stream_fps']:>6.1f}")
    for r in res["breakdown"]:
        lines.append(f"breakdown B={r['streams']}: vision {r['vision_ms']:.2f} ms, LLM {r['llm_ms']:.2f} ms, "
                     f"whole step {r['frame_step_ms']:.2f} ms")
    return "\n".join(lines)


def plot(res, path: Path) -> None:
    w = res["single"]["windows"]
    xs = [r["frames"] for r in w]
    fps = [r["fps"] for r in w]
    mem = [r["alloc_gib"] for r in w]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 3, figsize=(15, 4))
        ax[0].plot(xs, fps, "o-")
        ax[0].set(xlabel="frames streamed", ylabel=f"FPS (window of {res['single']['window']})", ylim=(0, max(fps) * 1.2),
                  title="single stream")
        if mem[0] is not None:
            ax[1].plot(xs, mem, "o-", color="tab:green")
            ax[1].set(xlabel="frames streamed", ylabel="GPU memory allocated (GiB)", ylim=(0, max(mem) * 1.2),
                      title="memory")
        ax[2].bar([str(r["streams"]) for r in res["many"]], [r["fps_aggregate"] for r in res["many"]])
        ax[2].set(xlabel="concurrent streams", ylabel="aggregate FPS", title="batched replay")
        fig.suptitle(f"{res['device']}: InfiniteVL {res['shape']} streaming, {res['frame_size']}px frames, "
                     f"{res['single']['clip']} frame(s) a step")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    except ImportError:  # no matplotlib (CPU dev installs): FPS per window as a PIL line
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (640, 400), "white")
        d = ImageDraw.Draw(img)
        top = max(fps) * 1.2
        pts = [(50 + i * 560 / max(1, len(fps) - 1), 360 - f / top * 320) for i, f in enumerate(fps)]
        d.line([(50, 360), (620, 360)], fill="black")
        d.line([(50, 20), (50, 360)], fill="black")
        if len(pts) > 1:
            d.line(pts, fill="blue", width=2)
        d.text((60, 5), f"single-stream FPS per window (0..{top:.0f})", fill="black")
        img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (seconds)")
    p.add_argument("--out", type=Path, default=Path("out/stream"))
    p.add_argument("--frame-size", type=int, default=None, help="square frames (default 448; tiny 56)")
    p.add_argument("--frames", type=int, default=None, help="single-stream frames (default 10,000; tiny 40)")
    p.add_argument("--window", type=int, default=None, help="frames per FPS/memory sample (default 500; tiny 10)")
    p.add_argument("--streams", type=int, nargs="*", default=None, help="concurrent streams (default 8 32; tiny 2 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per batched point (default 40; tiny 3)")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="stop the single-stream run at the first window boundary after this many seconds")
    p.add_argument("--no-pipeline", action="store_true",
                   help="run each frame whole (no vision of frame t+1 beside the LLM part of frame t)")
    p.add_argument("--frames-per-step", type=int, nargs="+", default=[1],
                   help="single stream: frames pushed per step (push_clip when > 1); the first is the headline "
                        "run, the others run two windows each (default 1)")
    p.add_argument("--swa-block-prefill", type=int, default=None,
                   help="ops.swa_fast.BLOCK_PREFILL_MAX_T for this run (0: SDPA over the ring, 512: the block kernel)")
    args = p.parse_args(argv)
    if args.swa_block_prefill is not None:
        from infinitevl.ops import swa_fast

        swa_fast.BLOCK_PREFILL_MAX_T = args.swa_block_prefill

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    size = args.frame_size or (56 if args.tiny else 448)
    n_frames = args.frames or (40 if args.tiny else 10_000)
    window = args.window or (10 if args.tiny else 500)
    streams = args.streams or ([2, 4] if args.tiny else [8, 32])
    steps = args.steps or (3 if args.tiny else 40)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(8)]

    model = build(args.tiny, device, dtype)
    tok = ByteTokenizer(model.config)
    spec = FrameSpec(height=size, width=size)
    res = dict(bench="stream", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               shape="tiny" if args.tiny else "4b", dtype=str(dtype), torch=torch.__version__, frame_size=size,
               tokens_per_frame=spec.tokens_per_frame, params=sum(p.numel() for p in model.parameters()))
    res["gate"] = gate(model, tok, spec, pool[:4], device)
    # what a StreamSession sets (the gate's reference session switched the kernels): the breakdown below
    # builds its FrameStep directly, so it must find the session's fast vision tower
    res["backend"] = model.set_backend("auto", vision=True)
    print("gate:", res["gate"], flush=True)

    def save():  # after each part too: a run cut short by a time limit keeps what it measured
        (args.out / "results.json").write_text(json.dumps(res, indent=1))

    # the headline first (the 10,000-frame single stream), then the rest
    pipeline = False if args.no_pipeline else None  # None: the session's default (on with CUDA graphs)
    clip, *other_clips = args.frames_per_step
    res["single"] = single_stream(model, tok, spec, pool, n_frames, window,
                                  warmup=(3 * 8 if not args.tiny else 3) * clip, device=device, budget_s=args.budget_s,
                                  pipeline=pipeline, clip=clip)
    print("single stream:", {k: v for k, v in res["single"].items() if k != "windows"}, flush=True)
    save()
    if res["single"]["pipeline"]:  # the same without pipelining, shorter: what the pipeline buys
        seq = single_stream(model, tok, spec, pool, 2 * window, window, warmup=8 * clip, device=device,
                            pipeline=False, clip=clip)
        res["single_sequential_fps"] = seq["fps_median_window"]
        print("single stream, not pipelined:", res["single_sequential_fps"], flush=True)
        save()
    res["single_by_clip"] = {}
    for k in other_clips:  # the same stream with other frames per step, shorter
        r = single_stream(model, tok, spec, pool, 2 * window, window, warmup=2 * k, device=device, pipeline=pipeline,
                          clip=k)
        res["single_by_clip"][k] = r["fps_median_window"]
        print(f"single stream, {k} frames a step:", r["fps_median_window"], flush=True)
        save()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["many"] = []
    for B in streams:
        res["many"].append(many_streams(model, tok, spec, pool, B, steps, warmup=3, device=device, pipeline=pipeline))
        print("streams:", res["many"][-1], flush=True)
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["breakdown"] = [breakdown(model, spec, pool, B, steps, device) for B in (1, streams[-1])]
    print("breakdown:", res["breakdown"], flush=True)
    save()
    eager = single_stream(model, tok, spec, pool, 2 * window // 10 or 2, window // 10 or 1, warmup=3, device=device,
                          cuda_graph=False)
    res["single_eager_fps"] = eager["fps_median_window"]
    print(f"single stream, eager: {res['single_eager_fps']:.1f} FPS", flush=True)

    s = res["single"]
    agg = {r["streams"]: r["fps_aggregate"] for r in res["many"]}
    res["targets"] = dict(single_fps_ge_120=s["fps_median_window"] >= 120, flat_le_1_10=s["flatness"] <= 1.10,
                          memory_flat=s["alloc_growth_gib"] == 0 if s["alloc_growth_gib"] is not None else None,
                          aggregate_32_ge_250=agg[32] >= 250 if 32 in agg else None)
    print(table(res))
    save()
    plot(res, args.out / "stream.png")
    print(json.dumps(dict(
        bench="stream", device=res["device"], shape=res["shape"], gate=res["gate"]["passed"], backend=res["backend"],
        frame_size=size, tokens_per_frame=spec.tokens_per_frame, frames=s["frames"],
        single_eager_fps=round(res["single_eager_fps"], 1), pipeline=s["pipeline"],
        single_sequential_fps=round(res["single_sequential_fps"], 1) if "single_sequential_fps" in res else None,
        single_fps_median_window=round(s["fps_median_window"], 1), single_fps_overall=round(s["fps_overall"], 1),
        frames_per_step=s["clip"], single_fps_by_frames_per_step={str(k): round(v, 1)
                                                                   for k, v in res["single_by_clip"].items()},
        flatness=round(s["flatness"], 3), alloc_growth_gib=s["alloc_growth_gib"],
        gpu_alloc_gib=s["windows"][-1]["alloc_gib"], aggregate_fps={str(k): round(v, 1) for k, v in agg.items()},
        breakdown_ms={str(r["streams"]): {k: round(v, 2) for k, v in r.items() if k.endswith("_ms")}
                      for r in res["breakdown"]},
        targets=res["targets"])))
    return res


if __name__ == "__main__":
    main()
