"""A run stopped mid-epoch and resumed continues with bitwise the same losses as an uninterrupted
run: model, optimizer, scheduler, data position and RNG all come back exactly."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from infinitevl.training import sft
from infinitevl.training.data import DataConfig
from infinitevl.training.options import OptimConfig, RunConfig
from infinitevl.training.vision_inputs import VisionInputConfig

from .conftest import TINY_ASSET


def _cfg(synth_dir, out, **run):
    return sft.SFTConfig(
        model=str(TINY_ASSET), trainable=["gdn", "attention", "mlp"],
        data=DataConfig(train=[str(synth_dir / "train.jsonl")], max_tokens=512, row_tokens=160,
                        vision=VisionInputConfig(image_max_pixels=112 * 112)),
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.2),
        run=RunConfig(**{**dict(output_dir=str(out), epochs=2, max_steps=5, grad_accum=2, progress=False, log_every=1,
                                save_every=100, keep_last=1, bf16=False, gradient_checkpointing=True), **run}))


def test_resume_mid_epoch_is_bitwise_identical(synth_dir, tmp_path):
    full = sft.run(_cfg(synth_dir, tmp_path / "a"))
    first = sft.run(_cfg(synth_dir, tmp_path / "b", stop_after=2))
    assert first.stopped_early and first.final_step == 2
    assert (tmp_path / "b/latest").read_text().strip() == "step-000002"
    assert not list((tmp_path / "b").glob("*.tmp")) and not (tmp_path / "b/final").exists()
    rest = sft.run(_cfg(synth_dir, tmp_path / "b"))
    assert [h["step"] for h in rest.history] == [3, 4, 5]
    for a, b in zip(full.history[2:], rest.history):
        assert (a["loss"], a["grad_norm"], a["lr"], a["tokens"]) == (b["loss"], b["grad_norm"], b["lr"], b["tokens"])
    wa, wb = load_file(str(tmp_path / "a/final/model.safetensors")), load_file(str(tmp_path / "b/final/model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    logged = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 6))
    assert sorted(p.name for p in (tmp_path / "b").glob("step-*")) == ["step-000005"]  # keep_last=1


def test_resume_refuses_other_settings_and_damaged_checkpoints(synth_dir, tmp_path):
    """A resume never restarts quietly from step 0 over good checkpoints, nor continues with other settings."""
    import dataclasses

    import pytest

    out = tmp_path / "r"
    sft.run(_cfg(synth_dir, out, stop_after=2, save_every=1, keep_last=0))
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000001", "step-000002"]
    cfg = _cfg(synth_dir, out)
    with pytest.raises(ValueError, match=r"other optimizer settings \(optim.lr 0.001 -> 0.005\)"):
        sft.run(dataclasses.replace(cfg, optim=OptimConfig(lr=5e-3, warmup_ratio=0.2)))
    with pytest.raises(ValueError, match="another parameter set"):
        sft.run(dataclasses.replace(cfg, trainable=["gdn"]))
    state = out / "step-000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="step-000002 is damaged"):
        sft.run(cfg)
    state.unlink()  # incomplete: latest names a checkpoint that is not there
    with pytest.raises(ValueError, match=r"missing or incomplete.*echo step-000001"):
        sft.run(cfg)
    assert (out / "step-000001" / "trainer_state.pt").exists()  # the good checkpoint is untouched
    (out / "latest").write_text("step-000001\n")
    rest = sft.run(cfg)
    assert [h["step"] for h in rest.history] == [2, 3, 4, 5]


def test_resume_refuses_another_run_and_an_occupied_folder(synth_dir, tmp_path, capsys):
    """The checkpoint records what the run started from: another model, stage or an occupied folder with
    resume off are refused before anything is written; the same model moved elsewhere resumes."""
    import dataclasses
    import shutil

    import pytest
    from safetensors.torch import save_file

    out = tmp_path / "r"
    sft.run(_cfg(synth_dir, out, stop_after=2, save_every=1, keep_last=0))
    before = sorted(p.name for p in out.iterdir())
    cfg = _cfg(synth_dir, out)
    other = tmp_path / "other"
    shutil.copytree(TINY_ASSET, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k in sorted(weights) if k.startswith("visual."))  # a frozen weight
    weights[name] = weights[name] + 1
    save_file(weights, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match=r"belongs to another run \(model .* -> .*other'\)"):
        sft.run(dataclasses.replace(cfg, model=str(other)))
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run .*run.resume: true"):
        sft.run(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=False)))
    assert sorted(p.name for p in out.iterdir()) == before  # nothing pruned or written
    moved = tmp_path / "moved"
    shutil.copytree(TINY_ASSET, moved)
    rest = sft.run(dataclasses.replace(cfg, model=str(moved)))  # the same weights in another folder
    assert [h["step"] for h in rest.history] == [3, 4, 5]
    capsys.readouterr()
    again = sft.run(cfg)
    assert again.history == [] and again.final_step == 5
    assert "holds a finished run (5 steps): nothing to train" in capsys.readouterr().out


def test_resume_refuses_a_start_whose_trained_weights_differ(synth_dir, tmp_path):
    """Another fine-tune at the model path, with the same frozen weights but other trained ones (e.g. GDN), is
    another start: refused, not resumed as if the folder had moved."""
    import dataclasses
    import shutil

    import pytest
    from safetensors.torch import save_file

    out = tmp_path / "r"
    sft.run(_cfg(synth_dir, out, stop_after=1))
    other = tmp_path / "other"
    shutil.copytree(TINY_ASSET, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k in sorted(weights) if ".linear_attn." in k or "self_attn" in k)  # a trained weight
    weights[name] = weights[name] + 1
    save_file(weights, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match=r"belongs to another run \(model .* -> .*other'\)"):
        sft.run(dataclasses.replace(_cfg(synth_dir, out), model=str(other)))


def test_a_diverging_run_stops_before_saving_and_bad_numbers_are_refused(synth_dir, tmp_path):
    import pytest

    from infinitevl.training import options

    cfg = _cfg(synth_dir, tmp_path / "nan", save_every=1, max_steps=4)
    cfg.optim = OptimConfig(lr=1e12, warmup_ratio=0.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="training diverged"):
        sft.run(cfg)
    assert not (tmp_path / "nan" / "final").exists()
    for ck in (tmp_path / "nan").glob("step-*/model.safetensors"):  # what was saved is finite
        assert all(bool(t.isfinite().all()) for t in load_file(str(ck)).values())
    # without clipping the norm is still taken: gradients that stop being finite stop the run before a save
    cfg = _cfg(synth_dir, tmp_path / "noclip", save_every=1, max_steps=4)
    cfg.optim = OptimConfig(lr=1e12, warmup_ratio=0.0, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="training diverged"):
        sft.run(cfg)
    for ck in (tmp_path / "noclip").glob("step-*/model.safetensors"):
        assert all(bool(t.isfinite().all()) for t in load_file(str(ck)).values())
    for bad, message in (("optim.lr=inf", "finite number"), ("run.epochs=nan", "finite number"),
                         ("run.seed=" + "9" * 400, "finite number"),
                         ("data.vision.video_fps=0", "video_fps must be > 0"),
                         ("data.vision.image_max_pixels=-5", "image_max_pixels must be >= 1"),
                         ("data.row_tokens=0", "row_tokens must be >= 8"), ("data.workers=-1", "workers must be >= 0"),
                         ("loss_chunk=0", "loss_chunk must be >= 1"), ("run.device=tpu", "run.device must be")):
        with pytest.raises(ValueError, match=message):
            options.load(sft.SFTConfig, None, [f"model={TINY_ASSET}", bad])


def test_unwritable_output_dirs_and_full_disks_are_named(synth_dir, tmp_path, monkeypatch):
    import pytest

    from infinitevl.training import checkpointing

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="cannot be written"):
        sft.run(_cfg(synth_dir, tmp_path / "afile" / "sub"))
    real = checkpointing.save_file

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    out = tmp_path / "full"
    sft.run(_cfg(synth_dir, out, stop_after=1))  # step-000001 complete
    monkeypatch.setattr(checkpointing, "save_file", full_disk)
    with pytest.raises(ValueError, match=r"cannot write checkpoint step 2 .*No space left.*resume from .*step-000001"):
        sft.run(_cfg(synth_dir, out, stop_after=1))
    assert not list(out.glob("*.tmp")) and (out / "latest").read_text().strip() == "step-000001"
    monkeypatch.setattr(checkpointing, "save_file", real)
    rest = sft.run(_cfg(synth_dir, out))
    assert [h["step"] for h in rest.history] == [2, 3, 4, 5]
