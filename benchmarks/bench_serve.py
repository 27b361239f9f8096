"""Serving benchmark: N requests at once through continuous batching (`inference/scheduler.py`) against the same
N requests one after another on the engine (what a server without batching does).

    python benchmarks/bench_serve.py --out out/serve            # GPU: 4B shape, random bf16 weights
    python benchmarks/bench_serve.py --tiny --out out/serve     # CPU: tiny shapes, seconds

Order: a correctness gate first (the shipped model's questions through the scheduler, requests joining
midway, must give each request the tokens the engine gives it alone), then a warm-up round (graph capture,
kernel compilation), then for each N the median of --repeats rounds. Every request has a --prompt-token random
text prompt and generates --new-tokens tokens (no stop tokens, so each runs its full length). Host clock around
each round (the scheduler runs in its own thread), synchronised at the end.

Then the cost of a long prompt arriving while others decode: N-1 requests are generating when one
--long-prompt-tokens prompt arrives; for each --prefill-chunk (0: the whole prompt in one forward, no decode
step in between, as the scheduler did before in 8,192-token forwards) it reports the longest pause between two
tokens of the decoding requests while the long prompt goes in, and the long prompt's time to its first token
(median of --repeats). Prints tables and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import build_ours as build, sync  # noqa: E402  (the 4B / tiny model on random weights)
from infinitevl.chat import chat_inputs  # noqa: E402
from infinitevl.cli import DEFAULT_MODEL, load_model  # noqa: E402
from infinitevl.inference.engine import Engine  # noqa: E402
from infinitevl.inference.scheduler import Scheduler  # noqa: E402
from infinitevl.media import process_vision_info  # noqa: E402

QUESTIONS = [("blue_star.png", "Describe the image."), ("three_circles.png", "How many shapes are there?"),
             ("blue_star.png", "What colour is the shape?"), (None, "Write a word.")]


def gate(device) -> dict:
    """The shipped model (float32): scheduler tokens == engine-alone tokens for each question."""
    model, processor = load_model(DEFAULT_MODEL, str(device), torch.float32, processor=True)
    prompts = []
    for image, question in QUESTIONS:
        content = ([{"type": "image", "image": str(DEFAULT_MODEL.parent / "examples" / image)}] if image else [])
        messages = [{"role": "user", "content": content + [{"type": "text", "text": question}]}]
        prompts.append(chat_inputs(processor, messages, process_vision_info(messages, return_video_kwargs=True),
                                   device))
    eos = model.config.eos_token_id
    alone = Engine(model)
    want = []
    for ids, vision in prompts:
        out = alone.generate(ids, max_new_tokens=16, stop_token_ids=[eos], **vision)[0].tolist()
        want.append(out[: out.index(eos) + 1] if eos in out else out)
    with Scheduler(Engine(model, max_batch_size=2), stop_token_ids=[eos], max_batch_size=2) as sched:
        tickets = [sched.submit(ids, max_new_tokens=16, **vision) for ids, vision in prompts]
        got = [list(t) for t in tickets]
    return {"passed": got == want, "requests": len(prompts), "tokens": sum(map(len, got))}


def sequential(engine: Engine, prompts, new_tokens: int, device) -> float:
    sync(device)
    t = time.perf_counter()
    for ids in prompts:
        engine.generate(ids, max_new_tokens=new_tokens)
    sync(device)
    return time.perf_counter() - t


def batched(sched: Scheduler, prompts, new_tokens: int, device) -> tuple[float, list[float]]:
    """(seconds until every request ended, each request's time to its first token); each request is read by its
    own thread, as a server's handlers read them."""
    sync(device)
    t = time.perf_counter()
    tickets = [sched.submit(ids, max_new_tokens=new_tokens) for ids in prompts]
    first = [0.0] * len(tickets)

    def read(k: int) -> None:
        it = iter(tickets[k])
        next(it)
        first[k] = time.perf_counter() - t
        for _ in it:
            pass

    threads = [threading.Thread(target=read, args=(k,)) for k in range(len(tickets))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sync(device)
    return time.perf_counter() - t, first


def interference(model, n: int, short: list, long: torch.Tensor, chunk: int, repeats: int, device) -> dict:
    """n-1 short prompts decoding when `long` arrives: the longest gap between two tokens of theirs until the long
    prompt's first token, and that first token's delay (seconds, medians over `repeats`)."""
    gaps, firsts = [], []
    with Scheduler(Engine(model, max_batch_size=n), stop_token_ids=[], max_batch_size=n,
                   prefill_chunk=chunk or long.shape[1]) as sched:
        for _ in range(repeats + 1):  # the first round warms up (the chunk shapes), and is dropped
            tickets = [sched.submit(ids, max_new_tokens=10**6) for ids in short[: n - 1]]
            stamps = [[] for _ in tickets]

            def read(k: int) -> None:
                for _ in tickets[k]:
                    stamps[k].append(time.perf_counter())

            threads = [threading.Thread(target=read, args=(k,)) for k in range(len(tickets))]
            for th in threads:
                th.start()
            deadline = time.perf_counter() + 600
            while min(map(len, stamps)) < 8:  # all decoding
                if time.perf_counter() > deadline or not all(th.is_alive() for th in threads):
                    raise SystemExit("the decoding requests did not start (or ended): see the scheduler's error")
                time.sleep(0.005)
            t = time.perf_counter()
            it = iter(sched.submit(long, max_new_tokens=1))
            next(it)
            t1 = time.perf_counter()
            time.sleep(0.05)  # the steps after it
            for tk in tickets:
                tk.cancel()
            for th in threads:
                th.join()
            gap = max(b - a for st in stamps for a, b in zip(st, st[1:]) if t <= b and a <= t1)
            gaps.append(gap)
            firsts.append(t1 - t)
    gaps, firsts = gaps[1:], firsts[1:]  # the first round warms the decoders' shapes
    return {"prefill_chunk": chunk or "whole", "max_token_gap_s": round(statistics.median(gaps), 4),
            "long_first_token_s": round(statistics.median(firsts), 4)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (seconds)")
    p.add_argument("--out", type=Path, default=Path("out/serve"))
    p.add_argument("--requests", type=int, nargs="*", default=None, help="concurrent requests (= batch rows)")
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--long-prompt-tokens", type=int, default=None, help="the prompt that arrives while others decode")
    p.add_argument("--prefill-chunk", type=int, nargs="*", default=None, help="scheduler prefill chunks (0: whole)")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    tiny = args.tiny or device.type == "cpu"
    ns = args.requests or ([2, 4] if tiny else [8, 32])
    T = args.prompt_tokens or (32 if tiny else 1024)
    G = args.new_tokens or (8 if tiny else 128)
    args.out.mkdir(parents=True, exist_ok=True)

    res = {"bench": "serve", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "gate": gate(device), "prompt_tokens": T, "new_tokens": G, "rows": []}
    if not res["gate"]["passed"]:
        print(json.dumps(res))
        raise SystemExit("gate failed: the scheduler's tokens differ from the engine's alone")
    model = build(tiny, device, torch.float32 if tiny else torch.bfloat16)
    vocab, cfg = model.config.text.vocab_size, model.config
    specials = torch.tensor([cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                             cfg.vision_end_token_id])
    g = torch.Generator().manual_seed(0)
    one = Engine(model, max_batch_size=1)
    for n in ns:
        prompts = [torch.randint(0, vocab, (1, T), generator=g) for _ in range(n)]
        for ids in prompts:  # text only: no vision placeholder ids
            ids[torch.isin(ids, specials)] = 0
        prompts = [ids.to(device) for ids in prompts]
        with Scheduler(Engine(model, max_batch_size=n), stop_token_ids=[], max_batch_size=n) as sched:
            batched(sched, prompts, 4, device)  # warm-up: graphs, kernels (every prefill group shape of the rounds)
            sequential(one, prompts[:1], 4, device)
            sched.stats.update(prefills=0, prefill_chunks=0, prefill_s=0.0, steps=0, step_s=0.0, row_steps=0)
            rounds = [batched(sched, prompts, G, device) for _ in range(args.repeats)]
            st = dict(sched.stats)
        seq = statistics.median(sequential(one, prompts, G, device) for _ in range(max(1, args.repeats // 2)))
        wall = statistics.median(r[0] for r in rounds)
        first = statistics.median(statistics.median(r[1]) for r in rounds)
        row = {"requests": n, "batched_s": round(wall, 4), "sequential_s": round(seq, 4),
               "batched_tokens_per_s": round(n * G / wall, 1), "sequential_tokens_per_s": round(n * G / seq, 1),
               "speedup": round(seq / wall, 2), "median_first_token_s": round(first, 4),
               "prefill_ms_per_request": round(1e3 * st["prefill_s"] / max(st["prefills"], 1), 2),
               "step_ms": round(1e3 * st["step_s"] / max(st["steps"], 1), 3),
               "rows_per_step": round(st["row_steps"] / max(st["steps"], 1), 1),
               "scheduler_stats": {k: round(v, 4) if isinstance(v, float) else v for k, v in st.items()}}
        res["rows"].append(row)
    L = args.long_prompt_tokens or (256 if tiny else 16384)
    n = max(max(ns), 2)  # n - 1 requests decode beside the long prompt
    long = torch.randint(0, vocab, (1, L), generator=g)
    long[torch.isin(long, specials)] = 0
    short = [torch.randint(0, vocab, (1, T), generator=g) for _ in range(n - 1)]
    for ids in short:
        ids[torch.isin(ids, specials)] = 0
    short = [ids.to(device) for ids in short]
    res["long_prompt_tokens"], res["decoding_requests"] = L, n - 1
    res["interference"] = [interference(model, n, short, long.to(device), c, args.repeats, device)
                           for c in (args.prefill_chunk if args.prefill_chunk is not None
                                     else [0, 64] if tiny else [0, 2048, 512])]
    lines = [f"device: {res['device']}; {T}-token prompts, {G} new tokens each; gate passed "
             f"({res['gate']['requests']} requests)",
             "| requests | batched s | tok/s | sequential s | tok/s | speedup | median first token s | prefill ms/request "
             "| step ms (rows) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['requests']} | {r['batched_s']} | {r['batched_tokens_per_s']} | {r['sequential_s']} | "
              f"{r['sequential_tokens_per_s']} | {r['speedup']}x | {r['median_first_token_s']} | "
              f"{r['prefill_ms_per_request']} | {r['step_ms']} ({r['rows_per_step']}) |" for r in res["rows"]]
    lines += ["", f"a {L}-token prompt arriving while {n - 1} requests decode:",
              "| prefill chunk | longest pause of the others s | long prompt's first token s |", "| --- | --- | --- |"]
    lines += [f"| {r['prefill_chunk']} | {r['max_token_gap_s']} | {r['long_first_token_s']} |"
              for r in res["interference"]]
    print("\n".join(lines))
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
