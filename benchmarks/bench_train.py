"""Stage-2 training throughput: our training step (the loop of src/infinitevl/training) on packed rows.

    python benchmarks/bench_train.py --out out/train                     # GPU: the 4B shape, 8K rows
    torchrun --nproc_per_node 2 benchmarks/bench_train.py --out out/tr2  # the same over 2 GPUs (FSDP2)
    python benchmarks/bench_train.py --tiny --out out/tiny               # CPU: tiny shapes, seconds

What runs is `Trainer._train_step` (training/loop.py) with the stage-2 objective (training/sft.py): rows of
`--row-tokens` random-token samples packed with cu_seqlens, gradient checkpointing, bf16 autocast over
float32 master weights (the loop's default; `--weights bf16` keeps bf16 weights and AdamW states instead),
AdamW + cosine, gradient clipping. `--trainable` picks the trained set (all: full parameters, like the
anchors; the published stage 2 trains gdn,attention). The vision tower is frozen and idle (text rows).
Global rows per step = `--rows-per-step`, split over the processes, so 1 GPU x 2 rows and 2 GPUs x 1 row
see the same data and must agree on the loss.

Order: a correctness gate first (a small shape on the same device: the training backend's gradients ==
the plain-PyTorch reference backend's; then every measured step must give a finite loss and the loss on
the fixed rows must fall), then warm-up steps, then CUDA-event timings of each step, median.

FLOPs per token (what MFU divides by the peak, 989 TFLOP/s dense bf16 on H100 SXM):
  dense: 2 N_mm forward + 2 N_mm input-gradients + 2 N_train weight-gradients, where N_mm are the weights
         every token multiplies (all LLM matmuls incl. the tied lm_head, not the embedding lookup) and
         N_train the trained ones among them: 6 N for full-parameter training (the usual "6N");
  SWA:   per layer 4 H d_h c flops forward (QK^T and PV, c = keys each query sees within its sample and the
         window), x3 for forward + backward;
  GDN:   per layer and head about 2 (3 K V + C (K + V)) flops forward (state read, state write, WY
         correction; intra-chunk C = 64 attention), x3.
Gradient checkpointing recomputes the forward: that work is real but not "model" FLOPs, so MFU does not
count it (hardware utilisation would). Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from infinitevl import InfiniteVL, preset  # noqa: E402
from infinitevl.training import distributed  # noqa: E402
from infinitevl.training.loop import Trainer  # noqa: E402
from infinitevl.training.options import OptimConfig, RunConfig  # noqa: E402
from infinitevl.training.packing import PackedBatch  # noqa: E402
from infinitevl.training.params import count, set_trainable  # noqa: E402
from infinitevl.training.sft import CausalLMObjective  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM


# ---------------------------------------------------------------- data
def text_vocab(cfg) -> int:
    """Token ids below every vision special token (image/video placeholders, vision start/end): random text
    drawn from the whole vocabulary would now and then hold an image placeholder without pixels."""
    return min(cfg.text.vocab_size, cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
               cfg.vision_end_token_id)


def packed_row(index: int, *, tokens: int, vocab: int, min_len: int, max_len: int) -> PackedBatch:
    """Row `index` of the benchmark stream: random samples of min_len..max_len tokens filling `tokens`, ids
    below `vocab` (pass text_vocab(cfg)), seeded by the row index so every process count sees the same rows."""
    g = torch.Generator().manual_seed(1000 + index)
    lens = []
    while sum(lens) < tokens:
        lens.append(min(int(torch.randint(min_len, max_len + 1, (1,), generator=g)), tokens - sum(lens)))
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    targets[0, cu[1:] - 1] = -100  # a sample's last token predicts nothing
    pos = torch.cat([torch.arange(n) for n in lens])[None].expand(3, 1, tokens).contiguous()
    return PackedBatch(input_ids=ids, targets=targets, position_ids=pos, cu_seqlens=cu)


class FixedRows:
    """The RowLoader interface Trainer uses, over generated rows (rank r takes rows r, r + world, ...)."""

    def __init__(self, *, rows_per_step: int, d: distributed.Dist, repeat: bool, **row_kw):
        if rows_per_step % d.world:
            raise ValueError(f"--rows-per-step {rows_per_step} must be a multiple of the {d.world} processes")
        self.accum, self.d, self.repeat, self.row_kw = rows_per_step // d.world, d, repeat, row_kw
        self.step = 0
        self.state = type("S", (), {"epoch": 0})()
        self.dataset = type("D", (), {"skipped": {}})()
        self._cache: dict[int, PackedBatch] = {}

    def total_steps(self, epochs: float) -> int:
        return 10**6

    def next_step(self) -> list[PackedBatch]:
        s = 0 if self.repeat else self.step
        self.step += 1
        rows = [s * self.accum * self.d.world + k * self.d.world + self.d.rank for k in range(self.accum)]
        for r in rows:
            if r not in self._cache:
                self._cache[r] = packed_row(r, **self.row_kw)
        return [self._cache[r] for r in rows]

    def state_dict(self) -> dict:
        return {}


def init_weights(model: InfiniteVL) -> InfiniteVL:
    """Matrices ~ N(0, 0.02) (transformers' Qwen init) so the random model starts at a sane loss (~ln V)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.02)
    return model


# ---------------------------------------------------------------- FLOPs
def matmul_params(model: InfiniteVL, *, trained_only: bool) -> int:
    """Weights each token multiplies in the LLM (the tied head once, the embedding lookup not)."""
    n = 0
    for name, p in model.model.named_parameters():
        if p.ndim == 2 and "embed_tokens" not in name and (p.requires_grad or not trained_only):
            n += p.numel()
    head = model.lm_head.weight
    if head.requires_grad or not trained_only:
        n += head.numel()
    return n


def attention_flops_per_token(cfg, lens: list[int]) -> tuple[float, float]:
    """(SWA, GDN) forward+backward flops per token, averaged over the samples of a row."""
    t = cfg.text
    n_swa = sum(k == "sliding_attention" for k in t.layer_types)
    n_gdn = len(t.layer_types) - n_swa
    head_dim = t.hidden_size // t.num_attention_heads
    keys = sum(sum(min(i + 1, t.sliding_window) for i in range(n)) for n in lens) / sum(lens)
    swa = 3 * n_swa * 4 * t.num_attention_heads * head_dim * keys
    K, V, C = t.linear_head_dim, int(t.linear_head_dim * t.expand_v), 64
    gdn = 3 * n_gdn * t.num_linear_heads * 2 * (3 * K * V + C * (K + V))
    return swa, gdn


# ---------------------------------------------------------------- gate
def gradient_gate(device: torch.device, backend: str) -> dict:
    """Tiny shape on `device`: one packed row's loss and gradients, training backend vs reference."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    ref = init_weights(InfiniteVL(cfg)).to(device).train()
    ref.set_backend("torch")
    fast = InfiniteVL(cfg).to(device).train()
    fast.load_state_dict(ref.state_dict())
    fast.set_backend(backend)
    fast.model.gradient_checkpointing = True
    b = packed_row(0, tokens=512, vocab=text_vocab(cfg), min_len=40, max_len=200).to(device)
    out = {}
    for name, m in (("ref", ref), ("fast", fast)):
        loss, _ = CausalLMObjective(m)(b)
        loss.backward()
        out[name] = (loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None})
    (l_ref, g_ref), (l_fast, g_fast) = out["ref"], out["fast"]
    errs = sorted(((float((g_fast[k] - g_ref[k]).norm() / g_ref[k].norm().clamp_min(1e-12)), k) for k in g_ref),
                  reverse=True)
    worst = errs[0][0]
    loss_rel = float((l_fast - l_ref).abs() / l_ref.abs())
    # fla's Triton kernels round float32 dot inputs to TF32 (ENVIRONMENT.md). The decay's gradients carry the
    # most of that noise (A_log, dt_bias: sums over all tokens of terms that largely cancel; then a_proj, which
    # feeds the decay): on an H200, 2.8e-2 / 2.7e-2 / 1.4e-2 for one layer of the tiny shape, the same with and
    # without the fused residual adds (1.1e-2 at worst on other random rows), while the loss agrees to ~1e-6.
    # So gradients get 5e-2, the loss 1e-4. The torch backend against itself (CPU) must agree to float32 rounding.
    precision = os.environ.get("TRITON_F32_DEFAULT", "tf32") if backend == "fla" else None
    tol = 5e-2 if backend == "fla" else 1e-4
    return {"backend": backend, "triton_f32": precision, "loss_rel_err": loss_rel, "worst_grad_rel_err": worst,
            "worst": [[round(e, 7), k] for e, k in errs[:4]], "tol": tol,
            "passed": bool(loss_rel < 1e-4 and worst < tol and g_ref.keys() == g_fast.keys())}


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny preset on CPU (a test runs this)")
    ap.add_argument("--out", type=Path, default=Path("out/bench_train"))
    ap.add_argument("--row-tokens", type=int, default=8192)
    ap.add_argument("--rows-per-step", type=int, default=1, help="global rows per optimizer step")
    ap.add_argument("--rows-per-forward", type=int, default=1,
                    help="a rank's rows of a step run in one forward, concatenated (RunConfig.rows_per_forward)")
    ap.add_argument("--recompute-layers", type=int, default=None,
                    help="layers recomputed under gradient checkpointing (RunConfig.recompute_layers; default all)")
    ap.add_argument("--loss-chunk", type=int, default=4096, help="positions per chunk of the head + cross-entropy")
    ap.add_argument("--sample-tokens", type=int, nargs=2, default=[1024, 4096], metavar=("MIN", "MAX"))
    ap.add_argument("--trainable", default="all", help="comma list for set_trainable (all | gdn,attention | ...)")
    ap.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                    help="fp32: master weights + bf16 autocast (the loop's default); bf16: bf16 weights and states")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--parallel", default="fsdp", choices=["fsdp", "ddp", "none"])
    ap.add_argument("--profile", action="store_true", help="kernel-time breakdown of one step")
    ap.add_argument("--trace-every", type=float, default=0,
                    help="print every thread's Python stack every this many seconds (find where a slow step is)")
    args = ap.parse_args(argv)
    if args.trace_every > 0:
        import faulthandler

        faulthandler.dump_traceback_later(args.trace_every, repeat=True)

    d = distributed.init("cpu" if args.tiny else "auto")
    dev = d.device
    if args.tiny:
        args.row_tokens, args.sample_tokens = min(args.row_tokens, 256), [32, 128]
    backend = "fla" if dev.type == "cuda" else "torch"
    gate = gradient_gate(dev, backend)
    if d.main:
        print(f"[gate] {json.dumps(gate)}", flush=True)
    if not gate["passed"]:
        raise SystemExit("correctness gate failed: the training backend's gradients differ from the reference")

    cfg = preset("tiny" if args.tiny else "4b")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.weights == "bf16" else torch.float32
    with torch.device(dev):
        # values a released bf16 checkpoint holds (loaded in `dtype`): the loop then stores frozen ones in bf16
        model = init_weights(InfiniteVL(cfg)).to(torch.bfloat16).to(dtype)
    set_trainable(model, args.trainable.split(","))
    objective = CausalLMObjective(model, chunk=args.loss_chunk)
    run = RunConfig(output_dir=str(args.out / "run"), grad_accum=args.rows_per_step // d.world,
                    rows_per_forward=args.rows_per_forward, backend=backend,
                    bf16=args.weights == "fp32", gradient_checkpointing=True, recompute_layers=args.recompute_layers,
                    progress=False,
                    max_steps=args.warmup + args.steps + 1, parallel=args.parallel if d.world > 1 else "none")
    loader = FixedRows(rows_per_step=args.rows_per_step, d=d, repeat=True, tokens=args.row_tokens,
                       vocab=text_vocab(cfg), min_len=args.sample_tokens[0], max_len=args.sample_tokens[1])
    trainer = Trainer(objective, loader, run=run, optim=OptimConfig(lr=1e-4 if args.tiny else 2e-5, warmup_ratio=0.0),
                      d=d, model_config=cfg, init_dir=None)
    trained, total = count(model)

    if d.main:
        print(f"model built: {trained / 1e9:.3f} B of {total / 1e9:.3f} B parameters trained", flush=True)
    losses, ms = [], []
    for k in range(args.warmup + args.steps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            rec = trainer._train_step()
            b.record()
            b.synchronize()
            t = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            rec = trainer._train_step()
            t = (time.perf_counter() - t0) * 1e3
        losses.append(rec["loss"])
        if k >= args.warmup:
            ms.append(t)
        if d.main:
            print(f"step {k + 1}: loss {rec['loss']:.5f} grad_norm {rec['grad_norm']:.3f} {t:.1f} ms", flush=True)
    finite = all(x == x and abs(x) != float("inf") for x in losses)
    falls = losses[-1] < losses[0]
    if not (finite and falls):
        raise SystemExit(f"training check failed: losses {losses} (finite {finite}, falling {falls})")

    if args.trace_every > 0:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()
    breakdown = profile_step(trainer, dev) if args.profile and d.main else None
    lens = [int(n) for n in (packed_row(0, tokens=args.row_tokens, vocab=text_vocab(cfg),
                                        min_len=args.sample_tokens[0], max_len=args.sample_tokens[1]).cu_seqlens.diff())]
    n_mm, n_tr = matmul_params(model, trained_only=False), matmul_params(model, trained_only=True)
    dense = 4 * n_mm + 2 * n_tr
    swa, gdn = attention_flops_per_token(cfg, lens)
    med = statistics.median(ms)
    tokens_per_gpu = args.row_tokens * run.grad_accum / (med / 1e3)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    mfu = None if peak is None else tokens_per_gpu * (dense + swa + gdn) / (peak * 1e12)
    mfu_6n = None if peak is None else tokens_per_gpu * 6 * n_mm / (peak * 1e12)
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    res = {"bench": "train", "device": gpu, "world": d.world, "shape": "tiny" if args.tiny else "4b",
           "params_total": total, "params_trained": trained, "matmul_params": n_mm, "matmul_params_trained": n_tr,
           "row_tokens": args.row_tokens, "rows_per_step": args.rows_per_step, "rows_per_forward": args.rows_per_forward,
           "recompute_layers": args.recompute_layers, "loss_chunk": args.loss_chunk,
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
           "samples_per_row": len(lens),
           "weights": args.weights, "trainable": args.trainable, "backend": backend,
           "step_ms_median": round(med, 2), "step_ms": [round(x, 2) for x in ms],
           "tokens_per_s_per_gpu": round(tokens_per_gpu, 1), "tokens_per_s": round(tokens_per_gpu * d.world, 1),
           "flops_per_token": {"dense": dense, "swa": round(swa), "gdn": round(gdn)},
           "mfu": None if mfu is None else round(mfu, 4), "mfu_6n": None if mfu_6n is None else round(mfu_6n, 4),
           "peak_tflops": peak, "max_memory_gib": None if mem is None else round(mem, 1),
           "losses": [round(x, 6) for x in losses], "gate": gate, "breakdown_ms": breakdown}
    if d.main:
        print_table(res)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps({k: v for k, v in res.items() if k not in ("gate", "step_ms", "breakdown_ms")}), flush=True)
    distributed.shutdown(d)
    return res


def profile_step(trainer: Trainer, dev: torch.device) -> dict:
    """Kernel time of one training step, by kind (ms)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        trainer._train_step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    kinds = {"matmul": ("gemm", "sm90", "cutlass", "matmul", "addmm", "aten::mm", "aten::bmm", "nvjet"),
             "gdn": ("chunk", "fused_recurrent", "gated_delta", "wy", "solve_tril", "l2norm", "tilelang",
                           "kernel_kernel", "causal_conv", "_conv_"),
             "attention": ("attention", "fmha", "flash", "efficient", "softmax"),
             "norm/swiglu": ("layer_norm", "swiglu", "rms_norm"),
             "optimizer": ("adam", "multi_tensor", "foreach", "lerp", "addcdiv", "sqrt")}
    out: dict[str, float] = {k: 0.0 for k in kinds} | {"other": 0.0}
    top = []
    for e in prof.key_averages():
        t = (e.device_time_total if dev.type == "cuda" else e.self_cpu_time_total) / 1e3
        if dev.type == "cuda" and e.device_type.name != "CUDA":
            continue
        if dev.type != "cuda" and not e.key.startswith("aten::"):
            continue
        name = e.key.lower()
        kind = next((k for k, keys in kinds.items() if any(s in name for s in keys)), "other")
        out[kind] += t
        top.append((t, e.key[:90]))
    top.sort(reverse=True)
    for t, name in top[:30]:
        print(f"  {t:9.2f} ms  {name}")
    print(f"  {sum(t for t, _ in top):9.2f} ms  all kernels ({len(top)} kinds)")
    res = {k: round(v, 2) for k, v in out.items()}
    res["top_kernels"] = [[round(t, 3), name] for t, name in top[:80]]
    if dev.type == "cuda":  # which operators launched the GPU time (their kernels' time, not their children's)
        ops = sorted(((e.self_device_time_total / 1e3, e.count, e.key) for e in prof.key_averages()
                      if e.device_type.name == "CPU" and e.self_device_time_total > 0), reverse=True)
        print("one step by operator (its own kernels' time):")
        for t, n, key in ops[:25]:
            print(f"  {t:9.2f} ms  {n:5d}x  {key[:80]}")
        res["top_ops"] = [[round(t, 3), n, key[:120]] for t, n, key in ops[:60]]
        res["gpu_idle"] = idle_gaps(prof)
    return res


def idle_gaps(prof) -> dict:
    """Where the GPU waited between kernels in the profiled step: the idle time in gaps over 20 us, and the largest
    gaps with the kernels around them (a host-bound stretch shows as many gaps before small kernels)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    gaps, end, prev = [], None, ""
    for a, b, name in spans:
        if end is not None and a - end > 20:
            gaps.append((a - end, prev[:60], name[:60]))
        if end is None or b > end:
            end, prev = b, name
    gaps.sort(reverse=True)
    total = sum(g for g, _, _ in gaps) / 1e3
    print(f"GPU idle in gaps over 20 us: {total:.2f} ms in {len(gaps)} gaps; largest:")
    for g, before, after in gaps[:12]:
        print(f"  {g / 1e3:7.2f} ms  after {before}  before {after}")
    return {"idle_ms": round(total, 2), "gaps": len(gaps),
            "largest": [[round(g / 1e3, 3), before, after] for g, before, after in gaps[:40]]}


def print_table(r: dict) -> None:
    rows = [("device", r["device"]), ("processes", r["world"]), ("shape", r["shape"]),
            ("params total / trained", f"{r['params_total'] / 1e9:.3f} B / {r['params_trained'] / 1e9:.3f} B"),
            ("row", f"{r['row_tokens']} tokens, {r['samples_per_row']} samples, {r['rows_per_step']} row(s)/step, {r.get('rows_per_forward', 1)} per forward"),
            ("recomputed layers", "all" if r.get("recompute_layers") is None else str(r["recompute_layers"])),
            ("weights / backend", f"{r['weights']} / {r['backend']}"),
            ("step (median)", f"{r['step_ms_median']:.1f} ms"),
            ("tokens/s per GPU", f"{r['tokens_per_s_per_gpu']:.0f}"),
            ("FLOPs/token dense+swa+gdn", f"{r['flops_per_token']['dense'] / 1e9:.2f} + "
                                          f"{r['flops_per_token']['swa'] / 1e9:.2f} + {r['flops_per_token']['gdn'] / 1e9:.2f} G"),
            ("MFU (model FLOPs)", "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"),
            ("MFU (6N)", "-" if r["mfu_6n"] is None else f"{100 * r['mfu_6n']:.1f} %"),
            ("peak memory", "-" if r["max_memory_gib"] is None else f"{r['max_memory_gib']} GiB"),
            ("losses", " ".join(f"{x:.4f}" for x in r["losses"]))]
    if r.get("breakdown_ms"):
        kinds = {k: v for k, v in r["breakdown_ms"].items() if k not in ("top_kernels", "top_ops", "gpu_idle")}
        rows.append(("one step by kernel kind (ms)", json.dumps(kinds)))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(w)}  {v}")


if __name__ == "__main__":
    main()
