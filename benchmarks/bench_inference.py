"""Inference benchmark: InfiniteVL (4B shape) against transformers' Qwen2.5-VL-3B (SDPA), same process.

    python benchmarks/bench_inference.py --out out/bench          # GPU: the full run (~5 min on an H100)
    python benchmarks/bench_inference.py --tiny --out out/tiny    # CPU: tiny shapes, a few seconds

Both models get random weights (bf16 on GPU). Order: a correctness gate first (fast path vs the reference
kernels, CUDA-graph decode vs eager decode), then for each measurement a warm-up and the median of
CUDA-event timings (host clock on CPU). Measured:
- decode ms/token at batch 1 after a context of 1K, 8K, 32K, 128K and 1M tokens (ours: one prefill grown
  chunk by chunk, state carried; baseline: contexts up to --max-baseline-context, its KV cache grows),
- prefill tokens/s, and peak GPU memory over our 1M-token prefill (weights included),
- decode tokens/s at batch 1, 8, 32, 64 after a 1K-token prompt per row.
Prints a table, writes results.json and decode.png under --out, and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from infinitevl import InfiniteVL, preset  # noqa: E402
from infinitevl.hf import CACHE_NAME  # noqa: E402
from infinitevl.inference import generate  # noqa: E402
from infinitevl.inference.engine import Engine  # noqa: E402

K = 1024


# ---------------------------------------------------------------- timing helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, n: int, device, warmup: int = 3) -> list[float]:
    """Milliseconds of each of n calls (CUDA events around each call on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(n):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def wall(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    r = fn()
    sync(device)
    return time.perf_counter() - t, r


# ---------------------------------------------------------------- models
def build_ours(tiny: bool, device, dtype) -> InfiniteVL:
    cfg = preset("tiny" if tiny else "4b")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InfiniteVL(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def build_baseline(tiny: bool, device, dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if tiny:
        text = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                    num_attention_heads=4, num_key_value_heads=2, mrope=[4, 6, 6])
        vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                      fullatt_block_indexes=[1, 3])
    else:  # Qwen2.5-VL-3B
        text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=2, mrope=[16, 24, 24])
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                      fullatt_block_indexes=[7, 15, 23, 31])
    mrope = text.pop("mrope")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(**text, max_position_embeddings=1 << 21, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e6}),
        vision_config=vision, attn_implementation="sdpa", tie_word_embeddings=True,
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- correctness gate
@torch.no_grad()
def gate(model, engine, device, vocab, tiny):
    """Fast path == reference kernels on a prompt; CUDA-graph decode == eager decode."""
    T = 96 if tiny else 256
    ids = torch.randint(0, vocab, (1, T), device=device)
    res = {}
    if engine.backend == "fla":
        model.set_backend("torch")
        ref = model(ids, logits_to_keep=64).float()
        model.set_backend("fla")
        fast = model(ids, logits_to_keep=64).float()
        res["prefill_rel_err"] = ((fast - ref).norm() / ref.norm()).item()
        res["prefill_ok"] = res["prefill_rel_err"] < 3e-2
        eager = Engine(model, cuda_graph=False).generate(ids, max_new_tokens=16)
        graphed = engine.generate(ids, max_new_tokens=16)
        res["graph_equals_eager"] = graphed.tolist() == eager.tolist()
    else:
        want = generate(model, ids, max_new_tokens=8)
        res["engine_equals_reference_loop"] = engine.generate(ids, max_new_tokens=8).tolist() == want.tolist()
    res["passed"] = all(v for k, v in res.items() if isinstance(v, bool))
    return res


# ---------------------------------------------------------------- ours
@torch.no_grad()
def ours_by_context(model, engine, contexts, steps, chunk, device, vocab):
    """One prompt grown to each context in turn (state carried); decode timed from a copy of the state."""
    state = model.new_state(1)
    done, rows, prefill_s = 0, [], 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for ctx in contexts:
        ids = torch.randint(0, vocab, (1, ctx - done), device=device)
        dt, _ = wall(lambda: engine.prefill(ids, state=state, chunk_size=chunk), device)
        prefill_s += dt
        seg_tok_s = (ctx - done) / dt
        done = ctx
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        dec = engine.begin(torch.randint(0, vocab, (1, 1), device=device), state=state)
        ms = time_calls(lambda: engine.step(dec), steps, device)
        rows.append(dict(context=ctx, decode_ms=statistics.median(ms), prefill_tok_s=seg_tok_s,
                         prefill_total_s=prefill_s, peak_gib=peak))
    return rows


@torch.no_grad()
def ours_by_batch(model, engine, batches, prompt, steps, device, vocab):
    rows = []
    for B in batches:
        ids = torch.randint(0, vocab, (B, prompt), device=device)
        dec = engine.begin(ids)
        ms = statistics.median(time_calls(lambda: engine.step(dec), steps, device))
        rows.append(dict(batch=B, decode_ms=ms, tok_s=B * 1e3 / ms))
    return rows


# ---------------------------------------------------------------- baseline (transformers)
@torch.no_grad()
def hf_prefill_decode(hf, ids, steps, device):
    """(prefill seconds, median decode ms/step): transformers' own cache, eager steps."""
    dt, out = wall(lambda: hf(input_ids=ids, use_cache=True, logits_to_keep=1), device)
    cache, tok = getattr(out, CACHE_NAME), out.logits[:, -1].argmax(-1)  # transformers' name for its cache
    del out

    def step():
        nonlocal cache, tok
        o = hf(input_ids=tok[:, None], use_cache=True, **{CACHE_NAME: cache})
        cache, tok = getattr(o, CACHE_NAME), o.logits[:, -1].argmax(-1)

    ms = statistics.median(time_calls(step, steps, device))
    del cache
    return dt, ms


@torch.no_grad()
def baseline_by_context(hf, contexts, steps, device, vocab, max_ctx):
    rows = []
    for ctx in contexts:
        if ctx > max_ctx:
            rows.append(dict(context=ctx, decode_ms=None, note=f"not run (> --max-baseline-context {max_ctx})"))
            continue
        ids = torch.randint(0, vocab, (1, ctx), device=device)
        try:
            dt, ms = hf_prefill_decode(hf, ids, steps, device)
            rows.append(dict(context=ctx, decode_ms=ms, prefill_tok_s=ctx / dt))
        except torch.OutOfMemoryError:
            rows.append(dict(context=ctx, decode_ms=None, note="out of memory"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def baseline_by_batch(hf, batches, prompt, steps, device, vocab):
    rows = []
    for B in batches:
        ids = torch.randint(0, vocab, (B, prompt), device=device)
        _, ms = hf_prefill_decode(hf, ids, steps, device)
        rows.append(dict(batch=B, decode_ms=ms, tok_s=B * 1e3 / ms))
    return rows


# ---------------------------------------------------------------- report
def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def table(res) -> str:
    lines = ["decode at batch 1 (ms/token)",
             f"{'context':>9} | {'ours':>8} | {'baseline':>9} | {'speedup':>7} | {'ours prefill tok/s':>18}"]
    base = {r["context"]: r.get("decode_ms") for r in res["baseline_by_context"]}
    for r in res["ours_by_context"]:
        b = base.get(r["context"])
        sp = None if b is None else b / r["decode_ms"]
        lines.append(f"{r['context']:>9} | {fmt(r['decode_ms'], '.3f'):>8} | {fmt(b):>9} | {fmt(sp, '.1f'):>7} | "
                     f"{fmt(r['prefill_tok_s'], ',.0f'):>18}")
    lines += ["", "decode throughput (tokens/s)", f"{'batch':>6} | {'ours':>9} | {'baseline':>9}"]
    bb = {r["batch"]: r["tok_s"] for r in res["baseline_by_batch"]}
    for r in res["ours_by_batch"]:
        lines.append(f"{r['batch']:>6} | {r['tok_s']:>9,.0f} | {fmt(bb.get(r['batch']), ',.0f'):>9}")
    return "\n".join(lines)


def plot(res, path: Path) -> None:
    ours = [(r["context"], r["decode_ms"]) for r in res["ours_by_context"]]
    base = [(r["context"], r["decode_ms"]) for r in res["baseline_by_context"] if r.get("decode_ms")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        ax[0].plot(*zip(*ours), "o-", label="InfiniteVL (ours)")
        if base:
            ax[0].plot(*zip(*base), "s-", label="Qwen2.5-VL-3B (transformers, SDPA)")
        ax[0].set(xscale="log", yscale="log", xlabel="context tokens", ylabel="decode ms/token (batch 1)")
        ax[0].legend()
        for key, label, mark in (("ours_by_batch", "ours", "o-"), ("baseline_by_batch", "baseline", "s-")):
            pts = [(r["batch"], r["tok_s"]) for r in res[key]]
            if pts:
                ax[1].plot(*zip(*pts), mark, label=label)
        ax[1].set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s")
        ax[1].legend()
        fig.suptitle(res["device"])
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    except ImportError:  # no matplotlib (CPU dev installs): a plain PIL line chart of the first panel
        from PIL import Image, ImageDraw
        import math

        img = Image.new("RGB", (640, 400), "white")
        d = ImageDraw.Draw(img)
        pts_all = ours + base
        xs = [math.log(x) for x, _ in pts_all]
        ys = [math.log(y) for _, y in pts_all]
        sx = lambda x: 50 + (math.log(x) - min(xs)) / max(1e-9, max(xs) - min(xs)) * 560  # noqa: E731
        sy = lambda y: 360 - (math.log(y) - min(ys)) / max(1e-9, max(ys) - min(ys)) * 320  # noqa: E731
        d.line([(50, 360), (620, 360)], fill="black")
        d.line([(50, 20), (50, 360)], fill="black")
        for pts, color in ((ours, "blue"), (base, "red")):
            if len(pts) > 1:
                d.line([(sx(x), sy(y)) for x, y in pts], fill=color, width=2)
        d.text((60, 5), "decode ms/token vs context (log-log): blue ours, red baseline", fill="black")
        img.save(path)


# ---------------------------------------------------------------- main
def section(fn, res):
    """Runs one measurement; a failure is recorded (res['errors']) and the others still run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports what broke and goes on
        res.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
        print("ERROR:", res["errors"][-1], flush=True)
        return []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (seconds)")
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    p.add_argument("--contexts", type=int, nargs="*", default=None)
    p.add_argument("--batches", type=int, nargs="*", default=None)
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per point")
    p.add_argument("--prefill-chunk", type=int, default=8192)
    p.add_argument("--max-baseline-context", type=int, default=128 * K)
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    contexts = args.contexts or ([64, 256, 1024] if args.tiny else [K, 8 * K, 32 * K, 128 * K, 1024 * K])
    batches = args.batches or ([1, 2, 4] if args.tiny else [1, 8, 32, 64])
    steps = args.steps or (5 if args.tiny else 30)
    prompt = 32 if args.tiny else K
    chunk = min(args.prefill_chunk, 100) if args.tiny else args.prefill_chunk
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    model = build_ours(args.tiny, device, dtype)
    c = model.config  # random prompts stay below the vision placeholder ids
    vocab = min(c.text.vocab_size, c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id)
    engine = Engine(model, max_batch_size=max(batches))
    res = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", dtype=str(dtype),
               backend=engine.backend, cuda_graph=engine.cuda_graph, ours_params=n_params(model),
               torch=torch.__version__, prefill_chunk=chunk)
    res["gate"] = gate(model, engine, device, vocab, args.tiny)
    print("gate:", res["gate"], flush=True)
    res["ours_by_context"] = ours_by_context(model, engine, contexts, steps, chunk, device, vocab)
    print("ours by context:", res["ours_by_context"], flush=True)
    res["ours_by_batch"] = section(lambda: ours_by_batch(model, engine, batches, prompt, steps, device, vocab), res)
    print("ours by batch:", res["ours_by_batch"], flush=True)
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    res["baseline_by_context"], res["baseline_by_batch"] = [], []
    if not args.no_baseline:
        hf = build_baseline(args.tiny, device, dtype)
        res["baseline_params"] = n_params(hf)
        res["baseline_by_context"] = section(lambda: baseline_by_context(
            hf, contexts, min(steps, 20), device, vocab, args.max_baseline_context), res)
        print("baseline by context:", res["baseline_by_context"], flush=True)
        res["baseline_by_batch"] = section(lambda: baseline_by_batch(hf, batches, prompt, min(steps, 20), device,
                                                                     vocab), res)
        del hf

    ours = {r["context"]: r for r in res["ours_by_context"]}
    base = {r["context"]: r.get("decode_ms") for r in res["baseline_by_context"]}
    ms = [r["decode_ms"] for r in res["ours_by_context"]]
    sp32 = base.get(32 * K) and base[32 * K] / ours[32 * K]["decode_ms"] if 32 * K in ours else None
    res["summary"] = dict(
        decode_ms_b1_max=max(ms), decode_flatness=max(ms) / min(ms) - 1, speedup_32k=sp32,
        prefill_1m_peak_gib=ours[1024 * K]["peak_gib"] if 1024 * K in ours else None,
        prefill_tok_s_overall=contexts[-1] / res["ours_by_context"][-1]["prefill_total_s"],
    )
    s = res["summary"]
    res["targets"] = dict(
        decode_le_4ms=s["decode_ms_b1_max"] <= 4.0, flat_within_5pct=s["decode_flatness"] <= 0.05,
        speedup_32k_ge_15x=None if sp32 is None else sp32 >= 15,
        peak_1m_le_12gib=None if s["prefill_1m_peak_gib"] is None else s["prefill_1m_peak_gib"] <= 12,
    )
    print(table(res))
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    plot(res, args.out / "decode.png")
    print(json.dumps(dict(bench="inference", device=res["device"], gate=res["gate"]["passed"],
                          backend=res["backend"], summary=s, targets=res["targets"],
                          decode_ms_by_context={r["context"]: round(r["decode_ms"], 3) for r in res["ours_by_context"]},
                          baseline_ms_by_context={c: (None if v is None else round(v, 2)) for c, v in base.items()},
                          decode_tok_s_by_batch={r["batch"]: round(r["tok_s"]) for r in res["ours_by_batch"]},
                          baseline_tok_s_by_batch={r["batch"]: round(r["tok_s"]) for r in res["baseline_by_batch"]})))
    return res


if __name__ == "__main__":
    main()
