"""Stages 1a (layer-wise MSE) and 1b (end-to-end KL) lower their losses on a tiny random teacher,
and only the GDN mixers move."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from infinitevl import InfiniteVL
from infinitevl.training import distill_e2e, distill_layer
from infinitevl.training.data import DataConfig
from infinitevl.training.options import OptimConfig, RunConfig
from infinitevl.training.student import StudentSpec, build_student, load_teacher
from infinitevl.training.vision_inputs import VisionInputConfig


def _data(synth_dir):
    return DataConfig(train=[str(synth_dir / "train.jsonl")], max_tokens=512, row_tokens=200,
                      vision=VisionInputConfig(image_max_pixels=112 * 112), cache=True)


def _run(tmp, steps):
    return RunConfig(output_dir=str(tmp), epochs=100, max_steps=steps, grad_accum=1, progress=False, log_every=1,
                     save_every=1000, bf16=False, gradient_checkpointing=False)


def _mean(h, sl):
    return sum(r["loss"] for r in h[sl]) / len(h[sl])


def test_layerwise_distillation_loss_falls_and_only_gdn_trains(hf_teacher_dir, synth_dir, tmp_path):
    cfg = distill_layer.DistillLayerConfig(
        teacher=str(hf_teacher_dir), spec=StudentSpec(sliding_window=64, norm_eps=1e-6), data=_data(synth_dir),
        optim=OptimConfig(lr=5e-3, warmup_ratio=0.0), run=_run(tmp_path, 24))
    res = distill_layer.run(cfg)
    h = res.history
    assert _mean(h, slice(-5, None)) < 0.5 * _mean(h, slice(0, 5)), [round(r["loss"], 3) for r in h]
    trained = InfiniteVL.from_pretrained(tmp_path / "final").state_dict()
    init = build_student(load_teacher(hf_teacher_dir), cfg.spec).state_dict()
    for name, p in trained.items():
        is_gdn = any(name.startswith(f"model.layers.{i}.self_attn.") for i in (1, 2, 3))
        assert torch.equal(p, init[name]) != is_gdn, name


def test_end_to_end_distillation_loss_falls(hf_teacher_dir, synth_dir, tmp_path):
    cfg = distill_e2e.DistillE2EConfig(
        teacher=str(hf_teacher_dir), spec=StudentSpec(sliding_window=64, norm_eps=1e-6), data=_data(synth_dir),
        optim=OptimConfig(lr=5e-3, warmup_ratio=0.0), run=_run(tmp_path, 24))
    h = distill_e2e.run(cfg).history
    assert _mean(h, slice(-5, None)) < 0.7 * _mean(h, slice(0, 5)), [round(r["loss"], 4) for r in h]


def test_config_errors():
    with pytest.raises(ValueError, match="teacher"):
        distill_layer.DistillLayerConfig()
    with pytest.raises(ValueError, match="kl_reduction"):
        distill_e2e.DistillE2EConfig(teacher="x", kl_reduction="mean")


def test_pairs_and_trainable_sets_that_cannot_distil_are_refused(hf_teacher_dir, synth_dir, tmp_path):
    import json
    import shutil

    from infinitevl.training.student import convert

    student = tmp_path / "student"
    convert(hf_teacher_dir, student, StudentSpec(sliding_window=64))
    cfg = distill_layer.DistillLayerConfig(teacher=str(hf_teacher_dir), student=str(student), trainable=["vision"],
                                           data=_data(synth_dir), run=_run(tmp_path / "out", 1))
    with pytest.raises(ValueError, match=r"selects nothing in the decoder layers"):
        distill_layer.run(cfg)
    other = tmp_path / "other"
    shutil.copytree(student, other)
    config = json.loads((other / "config.json").read_text())
    config["image_token_id"] = config["video_token_id"] - 7
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not share the teacher's vocabulary \(image_token_id"):
        distill_layer.load_pair(str(hf_teacher_dir), str(other), StudentSpec())
    assert not (tmp_path / "out").exists()


def test_a_resume_with_another_teacher_is_refused(hf_teacher_dir, synth_dir, tmp_path):
    """The teacher is the one input no checkpoint holds: its weights are in the run's fingerprint, so another
    teacher (even beside a student given as a directory) is refused, and the same teacher moved resumes."""
    import shutil

    from safetensors.torch import load_file, save_file

    from infinitevl.training.student import convert

    student = tmp_path / "student"
    convert(hf_teacher_dir, student, StudentSpec(sliding_window=64))
    cfg = distill_e2e.DistillE2EConfig(teacher=str(hf_teacher_dir), student=str(student), data=_data(synth_dir),
                                       run=_run(tmp_path / "out", 3))
    cfg.run.stop_after = 1
    distill_e2e.run(cfg)
    cfg.run.stop_after = None
    other = tmp_path / "other_teacher"
    shutil.copytree(hf_teacher_dir, other)
    f = next(other.glob("*.safetensors"))
    weights = load_file(str(f))
    name = next(k for k in sorted(weights) if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"belongs to another run \(teacher "):
        distill_e2e.run(dataclasses.replace(cfg, teacher=str(other)))
    moved = tmp_path / "moved_teacher"
    shutil.copytree(hf_teacher_dir, moved)
    assert [h["step"] for h in distill_e2e.run(dataclasses.replace(cfg, teacher=str(moved))).history] == [2, 3]
