"""`infinitevl eval`: exact-match accuracy of a checkpoint on a chat-format data file (the training format).

Each record's last message is the expected answer; the model answers the conversation before it (greedy), and
the answer counts when it equals the expected text (both stripped). Records are answered in continuous batches
(`inference/scheduler.py`), so a GPU answers many at once; the results are those of answering each alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict, deque
from pathlib import Path


def _groups(path: Path, key: str, n: int) -> list[str]:
    """The value of `key` in each of the file's n records (JSON list or JSONL), as text ('-' where absent)."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        raw = json.loads(text)
    if len(raw) != n:
        raise ValueError(f"--group-by {key}: {path} has {len(raw)} entries for {n} records")
    return [str(r.get(key, "-")) if isinstance(r, dict) else "-" for r in raw]


def image_budget(model_dir: Path, vision):
    """`vision` (a VisionInputConfig) with the image pixel bounds of the checkpoint's preprocessor_config.json (what
    `generate` and `serve` use, and what the model was released with), when it gives them."""
    import dataclasses

    try:
        cfg = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return vision
    size = cfg.get("size") if isinstance(cfg.get("size"), dict) else {}
    lo, hi = cfg.get("min_pixels", size.get("shortest_edge")), cfg.get("max_pixels", size.get("longest_edge"))
    bounds = {k: int(v) for k, v in (("image_min_pixels", lo), ("image_max_pixels", hi)) if isinstance(v, int)}
    return dataclasses.replace(vision, **bounds)


def eval_main(argv: list[str]) -> int:
    from .cli import DEFAULT_MODEL, HelpFormatter, _device, _dtype, load_model, note_if_shipped

    ap = argparse.ArgumentParser(prog="infinitevl eval", formatter_class=HelpFormatter,
                                 description="Exact-match accuracy of a checkpoint on a chat-format data file (JSON or "
                                             "JSONL records as for training: messages with <image>/<video> "
                                             "placeholders, images, videos; the last message is the expected "
                                             "answer).")
    ap.add_argument("--data", type=Path, required=True, help="the records to answer (.json or .jsonl)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                    help="checkpoint directory (default: the small model shipped in the package)")
    ap.add_argument("--media-dir", type=Path, help="folder the records' media paths are relative to (default: the "
                                                   "data file's folder)")
    ap.add_argument("--limit", type=int, help="answer only the first N records")
    ap.add_argument("--group-by", help="also report accuracy per value of this top-level record key (e.g. task)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
    ap.add_argument("--batch-size", type=int, default=8, help="records answered together")
    ap.add_argument("--out", type=Path, help="write each record's answer as a JSON line here")
    ap.add_argument("--json", action="store_true", help="print one JSON line with the results")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on a GPU, float32 on CPU")
    args = ap.parse_args(argv)
    for name in ("max_new_tokens", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.out is not None and args.out.is_dir():
        ap.error(f"--out {args.out} is a folder: give a file name, e.g. {args.out / 'answers.jsonl'}")

    from .inference.engine import Engine
    from .inference.request import answer_stop_ids
    from .inference.scheduler import Scheduler
    from .model.infinitevl import VISION_KEYS
    from .training.data import DataConfig, chat_format_for, read_records
    from .training.vision_inputs import VisionInputConfig

    records = read_records(args.data, media_dir=args.media_dir)
    if not records:
        raise ValueError(f"{args.data} holds no records")
    groups = _groups(args.data, args.group_by, len(records)) if args.group_by else None
    records = records[: args.limit]
    device = _device(args.device)
    model, tokenizer = load_model(args.model, device, _dtype(args.dtype, device))
    note_if_shipped(args.model)
    fmt = chat_format_for(args.model, model.config, DataConfig(max_tokens=1 << 30,
                                                               vision=image_budget(args.model, VisionInputConfig())))
    stops = answer_stop_ids(model, tokenizer)
    t0 = time.perf_counter()
    rows: list[dict] = []
    with Scheduler(Engine(model, max_batch_size=args.batch_size), stop_token_ids=stops,
                   max_batch_size=args.batch_size) as sched:
        flight: deque = deque()  # (record index, expected, ticket): at most 2 batches' prompts held at once
        k = 0
        while k < len(records) or flight:
            while k < len(records) and len(flight) < 2 * args.batch_size:
                sample, expected = fmt.prompt(records[k])  # a bad record: a located ValueError
                vision = {name: getattr(sample, name).to(device) for name in VISION_KEYS
                          if getattr(sample, name) is not None}
                flight.append((k, expected, sched.submit(sample.input_ids[None].to(device),
                                                         max_new_tokens=args.max_new_tokens, **vision)))
                k += 1
            i, expected, ticket = flight.popleft()
            tokens = [t for t in ticket if t not in stops]
            answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            rows.append({"record": records[i].where, "expected": expected.strip(), "answer": answer,
                         "correct": answer == expected.strip(),
                         **({args.group_by: groups[i]} if groups else {})})
    seconds = time.perf_counter() - t0
    hits = sum(r["correct"] for r in rows)
    result = {"model": str(args.model), "data": str(args.data), "records": len(rows), "correct": hits,
              "accuracy": hits / len(rows), "seconds": round(seconds, 3)}
    if groups:
        by: dict[str, list[bool]] = defaultdict(list)
        for r in rows:
            by[r[args.group_by]].append(r["correct"])
        result["by_" + args.group_by] = {g: sum(v) / len(v) for g, v in sorted(by.items())}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"exact match: {hits}/{len(rows)} = {100 * result['accuracy']:.1f}% ({seconds:.1f} s)")
        for g, acc in result.get("by_" + (args.group_by or ""), {}).items():
            print(f"  {args.group_by} {g}: {100 * acc:.1f}%")
    sys.stdout.flush()
    return 0
