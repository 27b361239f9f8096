"""LoRA through PEFT: merged == unmerged outputs, and the long-SFT stage ends in a plain checkpoint."""
from __future__ import annotations

import pytest
import torch

from infinitevl import InfiniteVL
from infinitevl.model.config import InfiniteVLConfig
from infinitevl import cli
from infinitevl.training import long_sft
from infinitevl.training.data import DataConfig
from infinitevl.training.lora import LoRAConfig, add_lora, has_lora, merge_lora
from infinitevl.training.options import OptimConfig, RunConfig
from infinitevl.training.vision_inputs import VisionInputConfig

from .conftest import TINY_ASSET


def test_merged_equals_unmerged():
    torch.manual_seed(0)
    cfg = InfiniteVLConfig.from_file(TINY_ASSET)
    plain_keys = set(InfiniteVL(cfg).state_dict())
    model = add_lora(InfiniteVL(cfg), LoRAConfig(r=4, alpha=8, dropout=0.0)).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # B starts at zero; make the adapters do something
    ids = torch.randint(20, 900, (2, 40))
    with torch.no_grad():
        unmerged = model(ids)
        merged_model = merge_lora(model)
        merged = merged_model(ids)
    assert not has_lora(merged_model) and set(merged_model.state_dict()) == plain_keys
    scale = float(unmerged.abs().max())  # float32 rounding relative to the logits' size
    torch.testing.assert_close(merged, unmerged, atol=2e-6 * scale, rtol=1e-5)


def test_lora_config_errors():
    with pytest.raises(ValueError, match="match no decoder linear"):
        add_lora(InfiniteVL(InfiniteVLConfig.from_file(TINY_ASSET)), LoRAConfig(targets=["qkv"]))


def test_long_sft_writes_a_merged_plain_checkpoint(synth_dir, tmp_path):
    cfg = long_sft.LongSFTConfig(
        model=str(TINY_ASSET), lora=LoRAConfig(r=4, alpha=8, targets=["q_proj", "o_proj", "down_proj"]),
        data=DataConfig(train=[str(synth_dir / "train.jsonl"), {"path": str(synth_dir / "test.jsonl"), "repeat": 2}],
                        max_tokens=512, row_tokens=300, vision=VisionInputConfig(image_max_pixels=112 * 112)),
        optim=OptimConfig(lr=1e-2, warmup_ratio=0.0),
        run=RunConfig(output_dir=str(tmp_path), max_steps=3, grad_accum=1, progress=False, bf16=True))
    long_sft.run(cfg)
    before = InfiniteVL.from_pretrained(TINY_ASSET).state_dict()
    after = InfiniteVL.from_pretrained(tmp_path / "final").state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith(("q_proj.weight", "o_proj.weight", "down_proj.weight")) for k in changed)

    # a step checkpoint holds the unmerged adapters: loading it says how to merge it; merging gives final/
    step = tmp_path / "step-000003"
    with pytest.raises(ValueError, match="infinitevl merge-lora"):
        InfiniteVL.from_pretrained(step)
    assert cli.main(["merge-lora", str(step), "--out", str(tmp_path / "merged")]) == 0
    merged = InfiniteVL.from_pretrained(tmp_path / "merged").state_dict()
    assert merged.keys() == after.keys() and all(torch.equal(merged[k], after[k]) for k in after)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    with pytest.raises(SystemExit):  # a non-empty --out needs --force
        cli.main(["merge-lora", str(step), "--out", str(tmp_path / "merged")])
    for out in (tmp_path, step / "m"):  # never the run's folder (it holds the checkpoint) or inside the checkpoint
        with pytest.raises(SystemExit):
            cli.main(["merge-lora", str(step), "--out", str(out), "--force"])
    assert (step / "trainer_state.pt").exists() and (tmp_path / "final").exists()

    # another LoRA setting is another run: refused on resume, before anything is restored
    import dataclasses

    for lora in (LoRAConfig(r=4, alpha=64, targets=["q_proj", "o_proj", "down_proj"]),
                 LoRAConfig(r=2, alpha=8, targets=["q_proj", "o_proj", "down_proj"])):
        with pytest.raises(ValueError, match=r"belongs to another run \(lora "):
            long_sft.run(dataclasses.replace(cfg, lora=lora))
