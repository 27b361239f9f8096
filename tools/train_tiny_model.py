"""Train the tiny model shipped in the package, with the training pipeline, on the synthetic task.

    python tools/train_tiny_model.py --work /tmp/tinyrun [--only teacher,convert,...] [--ship]
        [--train 20000 --test 600 --workers 12 --eval-n 300]

Steps (each skipped when its output exists, so the script can be re-run after an interruption;
the training steps themselves resume from their last checkpoint):
  data      tools/synthetic_task.py: --train (20000) train / --test (600) test records
  init      a random transformers Qwen2.5-VL in the tiny shape (the tiny tokenizer's ids)
  vision    pretrain its (tiny, from-scratch) vision tower on fresh synthetic images with classification
            heads for shape / colour / count / word: a 64-wide ViT learns shapes far too slowly through
            the language loss alone (32% shape accuracy after 3 epochs of SFT). Written into the teacher init.
  teacher   `infinitevl train sft` on it, all-attention, everything trainable (configs/tiny/teacher_sft.yaml)
  convert   `infinitevl convert`: layers 1-3, 5-7 -> GDN (mimic init), window 64
  layer     `infinitevl train distill-layer` (configs/tiny/distill_layer.yaml)
  e2e       `infinitevl train distill-e2e`   (configs/tiny/distill_e2e.yaml)
  sft       `infinitevl train sft`            (configs/tiny/sft.yaml)
  eval      exact-match accuracy of teacher / distilled / final student on the test split -> results.json
  --ship    tools/make_tiny_model.py --weights <work>/sft/final (rewrites src/infinitevl/assets/tiny-infinitevl)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs/tiny"
STEPS = ("data", "init", "vision", "teacher", "convert", "layer", "e2e", "sft", "eval")


def _tool(name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def teacher_init(out: Path, seed: int = 0) -> None:
    """A random transformers Qwen2.5-VL with the tiny preset's shapes and the shipped tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    mtm = _tool("make_tiny_model")
    tok = mtm.build_tokenizer(0)
    cfg = mtm.tiny_config(tok)
    t, v = cfg.text, cfg.vision
    hf = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "mrope_section": t.mrope_section, "rope_theta": t.rope_theta},
            tie_word_embeddings=True, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.bos_token_id),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_heads=v.num_heads, window_size=v.window_size, out_hidden_size=v.out_hidden_size,
                           fullatt_block_indexes=v.fullatt_block_indexes, tokens_per_second=v.tokens_per_second),
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    mtm.write_tokenizer_files(tok, out)


def _vision_batch(job):
    """One batch of fresh labelled images (its own seeded generator, so workers can draw it)."""
    import random

    from infinitevl.training.vision_inputs import VisionInputConfig, VisionInputs

    seed, k, batch = job
    st = _tool("synthetic_task")
    vi = VisionInputs(VisionInputConfig(image_max_pixels=200704))
    rng = random.Random(f"vision-{seed}-{k}")
    colours = list(st.COLOURS)
    pixels, labels = [], []
    for _ in range(batch):
        kind = rng.choice(["single", "single", "count", "word"])
        shape, colour = rng.randrange(len(st.SHAPES)), rng.randrange(len(colours))
        if kind == "single":
            img, lab = st.single_shape(rng, st.SHAPES[shape], colours[colour]), {"shape": shape, "colour": colour}
        elif kind == "count":
            n = rng.randint(1, 5)
            img = st.many_shapes(rng, n, st.SHAPES[shape], colours[colour])
            lab = {"count": n - 1, "shape": shape, "colour": colour}
        else:
            w = rng.randrange(len(st.WORDS))
            img, lab = st.word_image(rng, st.WORDS[w]), {"word": w}
        px, grid = vi.image(img)
        pixels.append(px)
        labels.append(lab)
    return torch.cat(pixels), torch.tensor([list(grid)] * batch), labels


def pretrain_vision(init_dir: Path, out_dir: Path, *, steps: int = 3000, batch: int = 32, lr: float = 2e-3,
                    seed: int = 0, workers: int = 1) -> dict:
    """Multi-task classification on the pooled output of the teacher's vision tower + merger."""
    import multiprocessing as mp

    from torch import nn

    from infinitevl.training.student import load_teacher, save_teacher, copy_processor_files

    st = _tool("synthetic_task")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_teacher(init_dir)
    vis = teacher.visual.to(dev).train().requires_grad_(True)
    D = teacher.config.vision.out_hidden_size
    heads = nn.ModuleDict({"shape": nn.Linear(2 * D, len(st.SHAPES)), "colour": nn.Linear(2 * D, len(st.COLOURS)),
                           "count": nn.Linear(2 * D, 5), "word": nn.Linear(2 * D, len(st.WORDS))}).to(dev)
    params = list(vis.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 100) * 0.5 * (1 + torch.cos(torch.tensor(k / steps * 3.14159)).item()))
    hits: dict[str, list[int]] = {k: [] for k in heads}
    t0 = time.time()
    # one thread per worker: a forked child that enters an OpenMP region of the parent's pool hangs
    pool = mp.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None
    jobs = [(seed, k, batch) for k in range(steps)]
    batches = pool.imap(_vision_batch, jobs, chunksize=2) if pool else map(_vision_batch, jobs)
    for k, (pixels, grid, labels) in enumerate(batches):
        feats = vis(pixels.to(dev), grid.to(dev)).view(batch, -1, D)
        pooled = torch.cat([feats.mean(1), feats.amax(1)], -1)
        loss = 0.0
        for name, head in heads.items():
            rows = [i for i, lab in enumerate(labels) if name in lab]
            if rows:
                logits = head(pooled[rows])
                target = torch.tensor([labels[i][name] for i in rows], device=dev)
                loss = loss + nn.functional.cross_entropy(logits, target)
                hits[name] += (logits.argmax(-1) == target).tolist()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (k + 1) % 100 == 0:
            acc = {n: round(sum(v[-400:]) / max(1, len(v[-400:])), 3) for n, v in hits.items()}
            print(f"vision step {k + 1}/{steps} loss {float(loss.detach()):.3f} recent accuracy {acc} ({time.time() - t0:.0f} s)",
                  flush=True)
            if min(acc.values()) >= 0.99:  # every head is right on the last ~400 fresh images of its kind
                break
    if pool is not None:
        pool.terminate()
    teacher.visual.cpu().eval().requires_grad_(False)
    save_teacher(teacher, out_dir)
    copy_processor_files(init_dir, out_dir)
    return {n: sum(v[-400:]) / max(1, len(v[-400:])) for n, v in hits.items()}


def _train(stage: str, config: str, sets: list[str]) -> None:
    from infinitevl.cli_train import train_main

    argv = [stage, "--config", str(CONFIGS / config)]
    for s in sets:
        argv += ["--set", s]
    rc = train_main(argv)
    if rc != 0:
        raise SystemExit(f"{stage} stopped with code {rc}")


def evaluate(work: Path, n: int | None) -> tuple[dict, int]:
    """Exact-match accuracy of each trained model on the first n test records (all: None), and n."""
    from infinitevl import InfiniteVL
    from infinitevl.training.data import DataConfig, chat_format_for, read_records
    from infinitevl.training.evaluate import accuracy
    from infinitevl.training.student import load_teacher

    recs = read_records(work / "data/test.jsonl")[:n]
    tasks = [json.loads(line)["task"] for line in (work / "data/test.jsonl").read_text().splitlines()][:len(recs)]
    out = {}
    for name, path in (("teacher", work / "teacher/final"), ("distilled (1a+1b)", work / "distill-e2e/final"),
                       ("student after SFT", work / "sft/final")):
        if not path.exists():
            continue
        model = load_teacher(path, sliding_window=1024) if name == "teacher" else InfiniteVL.from_pretrained(path)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        fmt = chat_format_for(path, model.config, DataConfig(max_tokens=4096))
        t0 = time.time()
        out[name] = accuracy(model, fmt, recs, tasks=tasks)
        print(f"{name}: {json.dumps({k: round(v, 4) for k, v in out[name].items()})} ({time.time() - t0:.0f} s)",
              flush=True)
    return out, len(recs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="working directory (data, runs)")
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {STEPS}")
    ap.add_argument("--eval-n", type=int, default=None, help="evaluate on the first N test records")
    ap.add_argument("--train", type=int, default=20000, help="training records to generate")
    ap.add_argument("--test", type=int, default=600, help="test records to generate")
    ap.add_argument("--workers", type=int, default=1, help="processes for data generation and sample building")
    ap.add_argument("--vision-steps", type=int, default=3000, help="most vision-pretraining steps (stops at 99%%)")
    ap.add_argument("--ship", action="store_true", help="write the trained student into the package assets")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    w = args.work.resolve()
    steps = set(args.only.split(","))
    workers = [f"data.workers={args.workers if args.workers > 1 else 0}", "run.progress=false"]
    data = [f"data.train=[{{path: {w}/data/train.jsonl, repeat: 0.5}}]", *workers]
    full = [f"data.train=[{w}/data/train.jsonl]", *workers]
    timings = {}

    def step(name, fn, done: Path):
        if name in steps and not done.exists():
            t0 = time.time()
            fn()
            timings[name] = round(time.time() - t0)
            print(f"== {name} done in {timings[name]} s", flush=True)

    step("data", lambda: _tool("synthetic_task").main(
        ["--out", str(w / "data"), "--train", str(args.train), "--val", "0", "--test", str(args.test),
         "--workers", str(args.workers)]), w / "data/test.jsonl")
    step("init", lambda: teacher_init(w / "teacher-init"), w / "teacher-init/config.json")
    step("vision", lambda: pretrain_vision(w / "teacher-init", w / "teacher-vision", steps=args.vision_steps,
                                           workers=args.workers),
         w / "teacher-vision/config.json")
    step("teacher", lambda: _train("sft", "teacher_sft.yaml", [f"model={w}/teacher-vision", *full,
                                                               f"run.output_dir={w}/teacher"]), w / "teacher/final")
    from infinitevl.cli_train import convert_main
    step("convert", lambda: convert_main(["--teacher", str(w / "teacher/final"), "--out", str(w / "student-init"),
                                          "--sliding-window", "64", "--norm-eps", "1e-6"]), w / "student-init")
    step("layer", lambda: _train("distill-layer", "distill_layer.yaml", [
        f"teacher={w}/teacher/final", f"student={w}/student-init", *data, f"run.output_dir={w}/distill-layer"]),
        w / "distill-layer/final")
    step("e2e", lambda: _train("distill-e2e", "distill_e2e.yaml", [
        f"teacher={w}/teacher/final", f"student={w}/distill-layer/final", *data, f"run.output_dir={w}/distill-e2e"]),
        w / "distill-e2e/final")
    step("sft", lambda: _train("sft", "sft.yaml", [f"model={w}/distill-e2e/final", *full,
                                                   f"run.output_dir={w}/sft"]), w / "sft/final")
    if "eval" in steps:
        res, n_eval = evaluate(w, args.eval_n)
        teacher_acc = res.get("teacher", {}).get("all")
        ratios = {k: round(v["all"] / teacher_acc, 4) for k, v in res.items() if k != "teacher" and teacher_acc}
        (w / "results.json").write_text(json.dumps({
            "accuracy": res, "of_teacher": ratios, "eval_records": n_eval,
            "command": " ".join(["python", "tools/train_tiny_model.py", *(argv if argv is not None else sys.argv[1:])]),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "timings_s": timings}, indent=2) + "\n")
    if args.ship:
        _tool("make_tiny_model").main(["--weights", str(w / "sft/final")])


if __name__ == "__main__":
    main()
