"""Exact-match evaluation on chat records: greedy answers to the last user turn, compared with the
record's final assistant message (whitespace-stripped). Used for the synthetic task's accuracy."""
from __future__ import annotations

from collections import defaultdict

import torch

from ..inference.generate import generate
from ..model.infinitevl import VISION_KEYS, InfiniteVL
from .data import ChatFormat, Record


@torch.no_grad()
def answer(model: InfiniteVL, fmt: ChatFormat, rec: Record, *, max_new_tokens: int = 24) -> tuple[str, str]:
    """(generated answer, expected answer)."""
    s, expected = fmt.prompt(rec)
    dev = next(model.parameters()).device
    vision = {k: getattr(s, k).to(dev) for k in VISION_KEYS if getattr(s, k) is not None}
    stop = fmt.tok.convert_tokens_to_ids("<|im_end|>")
    out = generate(model, s.input_ids[None].to(dev), max_new_tokens=max_new_tokens, stop_token_ids=[stop],
                   **vision)[0]
    return fmt.tok.decode(out.cpu(), skip_special_tokens=True).strip(), expected.strip()


def accuracy(model: InfiniteVL, fmt: ChatFormat, records: list[Record], *, tasks: list[str] | None = None,
             max_new_tokens: int = 24) -> dict[str, float]:
    """{"all": accuracy, <task>: accuracy per task (when `tasks` gives one name per record)}."""
    if not records:
        raise ValueError("no records to evaluate: give at least one")
    if tasks is not None and len(tasks) != len(records):
        raise ValueError(f"tasks names one task per record: got {len(tasks)} for {len(records)} records")
    hits: dict[str, list[int]] = defaultdict(list)
    model.eval()
    for i, rec in enumerate(records):
        got, want = answer(model, fmt, rec, max_new_tokens=max_new_tokens)
        ok = int(got == want)
        hits["all"].append(ok)
        if tasks is not None:
            hits[tasks[i]].append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}
