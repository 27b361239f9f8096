"""The model shipped in the package was trained with this pipeline on the synthetic task
(tools/train_tiny_model.py): it answers fresh synthetic questions, images and a video-memory one."""
from __future__ import annotations

import random

from infinitevl import InfiniteVL
from infinitevl.training.data import DataConfig, chat_format_for, read_records
from infinitevl.training.evaluate import accuracy

from .conftest import TINY_ASSET, synthetic_task


def test_shipped_tiny_model_answers_fresh_synthetic_questions(tmp_path):
    st = synthetic_task()
    rng = random.Random("fresh-examples-for-the-shipped-model-test")
    lines = []
    tasks = [t for t in st.TASKS for _ in range(3)]
    for i, task in enumerate(tasks):
        lines.append(st.to_record(st.example(task, rng), tmp_path / "media", f"{i:03d}", tmp_path))
    import json

    (tmp_path / "fresh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    model = InfiniteVL.from_pretrained(TINY_ASSET)
    fmt = chat_format_for(TINY_ASSET, model.config, DataConfig())
    acc = accuracy(model, fmt, read_records(tmp_path / "fresh.jsonl"), tasks=tasks)
    assert acc["all"] >= 0.9, acc
    assert acc["video"] >= 2 / 3, acc  # the answer lies beyond the 64-token attention window: GDN memory
