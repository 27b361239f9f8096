"""RunConfig.recompute_layers: how many decoder layers recompute their forward in backward changes the work
done, never the loss or the gradients."""
from __future__ import annotations

import pytest
import torch

from infinitevl import InfiniteVL
from infinitevl.model.config import InfiniteVLConfig
from infinitevl.ops.rope import VisionTokens
from infinitevl.training.data import DataConfig, chat_format_for, read_records
from infinitevl.training.options import OptimConfig, RunConfig
from infinitevl.training.packing import pack
from infinitevl.training.sft import CausalLMObjective
from infinitevl.training.vision_inputs import VisionInputConfig

from .conftest import TINY_ASSET


def test_recomputing_some_layers_gives_the_loss_and_gradients_of_all_or_none(synth_dir):
    cfg = InfiniteVLConfig.from_file(TINY_ASSET)
    torch.manual_seed(0)
    model = InfiniteVL(cfg).train()
    fmt = chat_format_for(TINY_ASSET, cfg, DataConfig(vision=VisionInputConfig(image_max_pixels=112 * 112)))
    vt = VisionTokens(cfg.image_token_id, cfg.video_token_id, cfg.vision.spatial_merge_size, cfg.vision.tokens_per_second)
    batch = pack([fmt.build(r) for r in read_records(synth_dir / "train.jsonl")[:3]], vt)
    layers = model.model.layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    objective = CausalLMObjective(model)
    n = len(layers)
    results = {}
    for ckpt, recompute in ((False, None), (True, None), (True, 0), (True, 1), (True, n - 1)):
        model.model.gradient_checkpointing, model.model.recompute_layers = ckpt, recompute
        model.zero_grad()
        calls[:] = [0] * n
        loss = objective(batch)[0]
        loss.backward()
        k = n if ckpt and recompute is None else (recompute or 0) if ckpt else 0
        assert calls == [2] * k + [1] * (n - k), (ckpt, recompute, calls)  # a recomputed layer runs twice
        results[(ckpt, recompute)] = (loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                                     if p.grad is not None})
    loss0, grads0 = results[(False, None)]
    for key, (loss, grads) in results.items():
        torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
        assert grads.keys() == grads0.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, grads0[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{key} {name}: {m}")


@pytest.mark.parametrize("bad", [-1, True, 4.5, "9"])
def test_recompute_layers_must_be_a_whole_number(bad):
    with pytest.raises(ValueError, match="recompute_layers"):
        RunConfig(recompute_layers=bad)


def _run(tmp, **kw):
    return RunConfig(output_dir=str(tmp), max_steps=1, grad_accum=1, progress=False, save_every=1000, bf16=False,
                     gradient_checkpointing=True, **kw)


@pytest.mark.parametrize("recompute,expected", [(None, 8), (3, 3), (0, 0)])
def test_the_trainer_applies_recompute_layers(synth_dir, tmp_path, monkeypatch, recompute, expected):
    """run.recompute_layers reaches the decoder: one SFT step checkpoints exactly the first N of the 8 layers."""
    from infinitevl.training import sft

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = sft.SFTConfig(model=str(TINY_ASSET),
                        data=DataConfig(train=[str(synth_dir / "train.jsonl")], max_tokens=512, row_tokens=300,
                                        vision=VisionInputConfig(image_max_pixels=12544)),
                        optim=OptimConfig(lr=1e-3, warmup_ratio=0.0),
                        run=_run(tmp_path / "run", device="cpu", recompute_layers=recompute))
    sft.run(cfg)
    assert len(calls) == expected


@pytest.mark.parametrize("recompute,expected", [(None, 3), (2, 1)])
def test_layerwise_distillation_recomputes_only_the_first_layers(hf_teacher_dir, synth_dir, tmp_path, monkeypatch,
                                                               recompute, expected):
    """Stage 1a checkpoints a trained layer (the GDN layers 1-3 of the tiny student) only when it is among the
    first run.recompute_layers."""
    from infinitevl.training import distill_layer
    from infinitevl.training.student import StudentSpec

    calls = []
    real = distill_layer.checkpoint
    monkeypatch.setattr(distill_layer, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = distill_layer.DistillLayerConfig(
        teacher=str(hf_teacher_dir), spec=StudentSpec(sliding_window=64, norm_eps=1e-6),
        data=DataConfig(train=[str(synth_dir / "train.jsonl")], max_tokens=512, row_tokens=200,
                        vision=VisionInputConfig(image_max_pixels=112 * 112)),
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.0), run=_run(tmp_path / "run", recompute_layers=recompute))
    distill_layer.run(cfg)
    assert len(calls) == expected
