"""The row loader: worker processes build exactly the rows the in-loop path builds, in order,
across epoch boundaries and after a resume; bad samples found by a worker are counted (or raised)."""
from __future__ import annotations

import json

import pytest
import torch

from infinitevl.model.config import InfiniteVLConfig
from infinitevl.ops.rope import VisionTokens
from infinitevl.training.data import BadSample, ChatDataset, DataConfig, chat_format_for, read_records
from infinitevl.training.loader import RowLoader
from infinitevl.training.vision_inputs import VisionInputConfig

from .conftest import TINY_ASSET


@pytest.fixture(scope="module")
def parts():
    cfg = InfiniteVLConfig.from_file(TINY_ASSET)
    fmt = chat_format_for(TINY_ASSET, cfg, DataConfig(max_tokens=512, vision=VisionInputConfig(image_max_pixels=112 * 112)))
    vt = VisionTokens(image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                      spatial_merge_size=cfg.vision.spatial_merge_size, tokens_per_second=cfg.vision.tokens_per_second)
    return fmt, vt


def _batches(loader, steps):
    out = []
    for _ in range(steps):
        out.append([(b.input_ids.clone(), b.targets.clone(), None if b.pixel_values is None else b.pixel_values.clone())
                    for b in loader.next_step()])
    return out


def _same(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert len(sa) == len(sb)
        for x, y in zip(sa, sb):
            assert all((u is None and v is None) or torch.equal(u, v) for u, v in zip(x, y))


def test_workers_build_the_same_rows_across_epochs_and_resume(parts, synth_dir):
    fmt, vt = parts
    ds = ChatDataset(read_records(synth_dir / "train.jsonl"), fmt)
    kw = dict(budget=300, accum=2, seed=3)
    plain = RowLoader(ds, vt, **kw)
    steps = plain.total_steps(2) + 1  # over an epoch boundary and into the third epoch
    ref = _batches(plain, steps)
    fast = RowLoader(ds, vt, workers=2, prefetch=3, **kw)
    try:
        _same(_batches(fast, steps), ref)
        fast.load_state_dict({"epoch": 0, "step": 1})  # a resume drops what was prefetched
        _same(_batches(fast, 2), ref[1:3])
    finally:
        fast.close()


def test_worker_bad_samples_are_counted_or_raised(parts, synth_dir, tmp_path):
    fmt, vt = parts
    good = [json.loads(x) for x in (synth_dir / "train.jsonl").read_text().splitlines() if '"images"' in x][:3]
    src = (synth_dir / good[0]["images"][0]).read_bytes()
    (tmp_path / "media").mkdir()
    (tmp_path / "media/trunc.png").write_bytes(src[: len(src) // 2])  # found only when the pixels are decoded
    recs = [dict(r, images=[str(synth_dir / r["images"][0])]) for r in good]
    recs.append(dict(good[0], images=["media/trunc.png"]))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for mode in ("skip", "error"):
        ds = ChatDataset(read_records(tmp_path / "d.jsonl"), fmt, on_bad_sample=mode)
        loader = RowLoader(ds, vt, budget=4096, accum=1, seed=0, shuffle=False, workers=2)
        try:
            if mode == "skip":
                (batch,) = loader.next_step()
                assert ds.skipped == {"media": 1} and len(batch.cu_seqlens) == 4  # 3 good samples packed
            else:
                with pytest.raises(BadSample, match="trunc.png"):
                    loader.next_step()
        finally:
            loader.close()
