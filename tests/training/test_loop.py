"""Trainer pieces: frozen weights stored in bf16 change nothing but their storage."""
from __future__ import annotations

import copy

import torch

from infinitevl import InfiniteVL
from infinitevl.model.config import InfiniteVLConfig
from infinitevl.ops.rope import VisionTokens
from infinitevl.training.data import DataConfig, chat_format_for, read_records
from infinitevl.training.loop import restore_dtypes, store_frozen_in_bf16
from infinitevl.training.packing import pack
from infinitevl.training.params import set_trainable
from infinitevl.training.sft import CausalLMObjective
from infinitevl.training.vision_inputs import VisionInputConfig

from .conftest import TINY_ASSET


def test_frozen_bf16_storage_keeps_loss_and_gradients(synth_dir):
    cfg = InfiniteVLConfig.from_file(TINY_ASSET)
    torch.manual_seed(0)
    model = InfiniteVL(cfg).to(torch.bfloat16).float()  # a released bf16 checkpoint, loaded in float32
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-4  # one weight that bf16 cannot hold
    set_trainable(model, ["gdn", "attention"])
    fmt = chat_format_for(TINY_ASSET, cfg, DataConfig(vision=VisionInputConfig(image_max_pixels=112 * 112)))
    recs = read_records(synth_dir / "train.jsonl")[:3]
    vt = VisionTokens(cfg.image_token_id, cfg.video_token_id, cfg.vision.spatial_merge_size, cfg.vision.tokens_per_second)
    batch = pack([fmt.build(r) for r in recs], vt)

    stored = copy.deepcopy(model)
    converted = store_frozen_in_bf16(stored)
    dtypes = {name: p.dtype for name, p in stored.named_parameters()}
    assert converted and dtypes["model.layers.0.mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["model.layers.1.mlp.up_proj.weight"] == torch.float32  # not exact in bf16: kept
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # the residual stream's dtype
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)
    assert all(torch.equal(p.float(), q) for p, q in zip(stored.parameters(), model.parameters(), strict=True))

    out = []
    for m in (model, stored):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = CausalLMObjective(m)(batch)[0]
        loss.backward()
        out.append((loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=0)
    for k, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][k], g, rtol=0, atol=0, msg=k)
    restore_dtypes(converted)
    assert all(p.dtype == torch.float32 and torch.equal(p, q) for p, q in zip(stored.parameters(), model.parameters()))


def _bf16_valued_model(tmp_path):
    """The tiny model with every weight rounded to bf16 (a released bf16 checkpoint), in float32 files."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "model"
    shutil.copytree(TINY_ASSET, src)
    for f in src.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16).float() for k, v in load_file(str(f)).items()}, str(f))
    return src


def test_a_bf16_run_keeps_frozen_weights_exact_and_one_dtype(synth_dir, tmp_path, monkeypatch):
    """A stage-2 run under bf16 autocast from a bf16-valued checkpoint: frozen weights live in bf16 during
    the run, yet the final checkpoint has one float dtype and the frozen weights bit for bit."""
    from safetensors.torch import load_file

    from infinitevl.training import sft
    from infinitevl.training.data import DataConfig
    from infinitevl.training.options import OptimConfig, RunConfig

    src = _bf16_valued_model(tmp_path)
    cfg = sft.SFTConfig(model=str(src), data=DataConfig(train=[str(synth_dir / "train.jsonl")], max_tokens=512,
                                                        row_tokens=300, vision=VisionInputConfig(image_max_pixels=12544)),
                        optim=OptimConfig(lr=1e-3, warmup_ratio=0.0),
                        run=RunConfig(output_dir=str(tmp_path / "run"), max_steps=2, grad_accum=1, progress=False,
                                      bf16=True, gradient_checkpointing=False))
    from infinitevl.training import loop

    converted = []
    store = loop.store_frozen_in_bf16
    monkeypatch.setattr(loop, "store_frozen_in_bf16", lambda m: converted.extend(store(m)) or converted)
    sft.run(cfg)
    assert len(converted) > 50 and all(p.dtype == torch.float32 for p, _ in converted)  # converted, then restored
    before, after = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "run/final/model.safetensors"))
    assert {v.dtype for v in after.values()} == {torch.float32}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".self_attn." in k or ".linear_attn." in k for k in changed), sorted(changed)[:5]


def test_a_run_that_fails_gives_the_model_back(synth_dir, tmp_path, monkeypatch):
    """A training step that raises: the frozen weights kept in bf16 are float32 again and the frozen sibling
    projections that shared one storage for the run (the MLPs' gate/up) have their own again."""
    import pytest

    from infinitevl.training import loop, sft
    from infinitevl.training.data import DataConfig
    from infinitevl.training.options import OptimConfig, RunConfig

    converted, groups = [], []
    store, share = loop.store_frozen_in_bf16, loop.share_frozen_storage
    monkeypatch.setattr(loop, "store_frozen_in_bf16", lambda m: converted.extend(store(m)) or converted)
    monkeypatch.setattr(loop, "share_frozen_storage", lambda m: groups.extend(share(m)) or groups)

    def fail(self):
        assert converted and groups  # in force during the run
        assert all(lin.weight.untyped_storage().nbytes() > lin.weight.numel() * 2 for g in groups for lin in g)
        raise RuntimeError("a step failed")

    monkeypatch.setattr(loop.Trainer, "_train_step", fail)
    cfg = sft.SFTConfig(model=str(_bf16_valued_model(tmp_path)), data=DataConfig(train=[str(synth_dir / "train.jsonl")], max_tokens=512,
                                                              row_tokens=300,
                                                              vision=VisionInputConfig(image_max_pixels=12544)),
                        optim=OptimConfig(lr=1e-3, warmup_ratio=0.0),
                        run=RunConfig(output_dir=str(tmp_path / "run"), max_steps=2, grad_accum=1, progress=False,
                                      bf16=True, gradient_checkpointing=False))
    with pytest.raises(RuntimeError, match="a step failed"):
        sft.run(cfg)
    assert all(p.dtype == torch.float32 for p, _ in converted)
    mlps = [g for g in groups if g[0].out_features == g[1].out_features]
    assert mlps and all(lin.weight.untyped_storage().nbytes() == lin.weight.numel() * lin.weight.element_size()
                        for g in groups for lin in g)


def test_the_trainer_applies_run_backend(synth_dir, tmp_path):
    """run.backend reaches the student: 'fla' on a CPU is refused with the remedy (on a GPU it runs fla's
    training kernels); an unknown name is refused by the config."""
    import pytest

    from infinitevl.training import sft
    from infinitevl.training.data import DataConfig
    from infinitevl.training.options import OptimConfig, RunConfig

    with pytest.raises(ValueError, match="run.backend"):
        RunConfig(backend="triton")
    cfg = sft.SFTConfig(model=str(TINY_ASSET), data=DataConfig(train=[str(synth_dir / "train.jsonl")], max_tokens=512,
                                                              row_tokens=300,
                                                              vision=VisionInputConfig(image_max_pixels=12544)),
                        optim=OptimConfig(lr=1e-3, warmup_ratio=0.0),
                        run=RunConfig(output_dir=str(tmp_path / "run"), max_steps=1, grad_accum=1, progress=False,
                                      device="cpu", backend="fla"))
    with pytest.raises(ValueError, match="backend='fla'"):
        sft.run(cfg)
