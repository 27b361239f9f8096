"""A packed row computes what its samples compute one by one: per-sample positions, GDN state and
attention window reset at each boundary, targets shifted inside each sample."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infinitevl import InfiniteVL
from infinitevl.model.config import InfiniteVLConfig
from infinitevl.ops.rope import VisionTokens
from infinitevl.training.data import DataConfig, Record, chat_format_for, read_records
from infinitevl.training.packing import pack, plan_rows, shifted_targets
from infinitevl.training.sft import CausalLMObjective
from infinitevl.training.vision_inputs import VisionInputConfig

from .conftest import TINY_ASSET


@pytest.fixture(scope="module")
def setup(synth_dir):
    cfg = InfiniteVLConfig.from_file(TINY_ASSET)
    torch.manual_seed(0)
    model = InfiniteVL(cfg).eval()
    fmt = chat_format_for(TINY_ASSET, cfg, DataConfig(vision=VisionInputConfig(image_max_pixels=112 * 112)))
    recs = read_records(synth_dir / "train.jsonl")
    video = next(r for r in recs if r.videos)
    image = next(r for r in recs if r.images)
    text = Record([{"role": "user", "content": "How many shapes are there? " * 8},
                   {"role": "assistant", "content": "There are three shapes. " * 6}], [], [], "text")
    samples = [fmt.build(r) for r in (image, video, text)]
    vt = VisionTokens(cfg.image_token_id, cfg.video_token_id, cfg.vision.spatial_merge_size, cfg.vision.tokens_per_second)
    return model, samples, vt


def _alone(model, s):
    kw = {k: getattr(s, k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                     "second_per_grid_ts") if getattr(s, k) is not None}
    return model(s.input_ids[None], **kw)[0]


def test_packed_loss_equals_samples_run_separately(setup):
    model, samples, vt = setup
    assert len(samples[1]) > model.config.text.sliding_window  # the window is exercised
    batch = pack(samples, vt)
    obj = CausalLMObjective(model)
    with torch.no_grad():
        packed = obj(batch)[0]
        separate = sum(F.cross_entropy(_alone(model, s), shifted_targets(s.labels), reduction="sum") for s in samples)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-4)
    assert batch.num_targets == sum(int((s.labels != -100).sum()) - int(s.labels[0] != -100) for s in samples)


def test_no_leakage_across_packed_samples(setup):
    model, samples, vt = setup
    batch = pack(samples, vt)
    with torch.no_grad():
        logits = model(**batch.model_inputs())[0]
    cu = batch.cu_seqlens.tolist()
    for k, s in enumerate(samples):
        torch.testing.assert_close(logits[cu[k]:cu[k + 1]], _alone(model, s), atol=1e-4, rtol=1e-4)
    # The last position of a sample predicts nothing (never the next sample's first token).
    assert all(int(batch.targets[0, c - 1]) == -100 for c in cu[1:])


def test_plan_rows_respects_budget_and_skips_bad():
    rows = plan_rows([3, 0, 1, 2, 4], [5, 5, None, 4, 12], budget=10)
    assert rows == [[3, 0], [1], [4]]  # 4 + 5 fit; 2 is bad; 12 > budget gets its own row


def test_every_layer_gets_one_int64_cu_seqlens(setup, monkeypatch):
    """fla caches the chunk indices it derives from cu_seqlens (a device sync each) by tensor identity: the
    model converts int32 lengths once, and every GDN rule and short conv sees that same int64 tensor."""
    from infinitevl.layers import gated_deltanet
    from infinitevl.ops import gated_delta

    model, samples, vt = setup
    batch = pack(samples, vt)
    assert batch.cu_seqlens.dtype == torch.int32
    seen = []
    rule, conv = gated_delta.gated_delta_rule, gated_deltanet.short_conv_packed
    monkeypatch.setattr(gated_delta, "gated_delta_rule", lambda *a, cu_seqlens=None, **k: seen.append(cu_seqlens)
                        or rule(*a, cu_seqlens=cu_seqlens, **k))
    monkeypatch.setattr(gated_deltanet, "short_conv_packed", lambda x, w, cu, **k: seen.append(cu) or conv(x, w, cu, **k))
    with torch.no_grad():
        CausalLMObjective(model)(batch)
    n_gdn = sum(t == "linear_attention" for t in model.config.text.layer_types)
    assert len(seen) == 4 * n_gdn  # q, k, v convs and the rule per GDN layer
    assert all(c is seen[0] for c in seen) and seen[0].dtype == torch.int64


def test_concatenated_rows_give_the_loss_and_gradients_of_separate_rows(synth_dir):
    """RunConfig.rows_per_forward: rows with images, concatenated into one forward, change nothing."""
    from infinitevl import InfiniteVL
    from infinitevl.model.config import InfiniteVLConfig
    from infinitevl.training.data import DataConfig, chat_format_for, read_records
    from infinitevl.training.packing import PackedBatch
    from infinitevl.training.sft import CausalLMObjective
    from infinitevl.training.vision_inputs import VisionInputConfig

    from .conftest import TINY_ASSET

    cfg = InfiniteVLConfig.from_file(TINY_ASSET)
    torch.manual_seed(0)
    model = InfiniteVL(cfg)
    fmt = chat_format_for(TINY_ASSET, cfg, DataConfig(vision=VisionInputConfig(image_max_pixels=112 * 112)))
    recs = read_records(synth_dir / "train.jsonl")[:5]
    vt = VisionTokens(cfg.image_token_id, cfg.video_token_id, cfg.vision.spatial_merge_size, cfg.vision.tokens_per_second)
    rows = [pack([fmt.build(r) for r in recs[:2]], vt), pack([fmt.build(r) for r in recs[2:]], vt)]
    assert all(r.pixel_values is not None for r in rows)
    both = PackedBatch.concat(rows)
    assert both.num_tokens == sum(r.num_tokens for r in rows)
    assert both.cu_seqlens.tolist() == rows[0].cu_seqlens.tolist() + [
        rows[0].num_tokens + int(c) for c in rows[1].cu_seqlens[1:]]
    objective = CausalLMObjective(model)
    grads = []
    for batches in (rows, [both]):
        model.zero_grad()
        total = sum(objective(b)[0] for b in batches)
        total.backward()
        grads.append((total.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    assert grads[1][1].keys() == grads[0][1].keys()
    for k, g in grads[0][1].items():
        rel = ((grads[1][1][k] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel < 1e-5, (k, rel)
