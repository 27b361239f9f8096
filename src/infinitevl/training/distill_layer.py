"""Stage 1a: layer-wise distillation (the published LayerDistillationTrainer).

The teacher runs once per row; for every decoder layer i the student's layer i gets the teacher's
input to layer i and is pulled towards the teacher's output of layer i:
    loss = mse_factor * mean_i MSE(student_layer_i(x_i), teacher_layer_i(x_i))   (mse_factor 1000)
Only the GDN mixers train (the kept attention layers, MLPs and norms are the teacher's and stay
frozen, so their terms are constants, kept for a loss comparable with the published one).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from ..model.infinitevl import InfiniteVL
from . import runner
from .data import DataConfig
from .loop import Objective, TrainResult
from .losses import mse_sum
from .options import OptimConfig, RunConfig
from .packing import PackedBatch
from .params import set_trainable
from .student import StudentSpec, build_student, load_teacher


@dataclass
class DistillLayerConfig:
    teacher: str = ""  # transformers Qwen2.5-VL checkpoint directory
    student: str = ""  # InfiniteVL init (from `infinitevl convert`); empty: convert the teacher with `spec`
    spec: StudentSpec = field(default_factory=StudentSpec)
    mse_factor: float = 1000.0  # loss = mean over layers of the MSE x mse_factor
    trainable: list[str] = field(default_factory=lambda: ["gdn"])  # parameter groups or name patterns (params.py)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/distill-layer"))

    def __post_init__(self):
        if not self.teacher:
            raise ValueError("teacher is empty: set it (teacher: DIR in the config, or --set teacher=DIR) "
                             "to a transformers Qwen2.5-VL checkpoint directory")


class LayerwiseObjective(Objective):
    def __init__(self, student: InfiniteVL, teacher: InfiniteVL, *, mse_factor: float = 1000.0):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never wrapped, sharded or saved
        self.mse_factor = mse_factor

    def units(self, batch: PackedBatch) -> int:
        return batch.num_tokens * self.student.config.text.hidden_size

    @torch.no_grad()
    def teacher_layers(self, batch: PackedBatch) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        t = self.teacher
        inputs = batch.model_inputs()
        x = t.embed(inputs["input_ids"], **{k: v for k, v in inputs.items()
                                            if k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                     "video_grid_thw")})
        kw = dict(t.model.layer_inputs(x, batch.position_ids, cu_seqlens=batch.cu_seqlens), state=None)
        ins, outs = [], []
        for layer in t.model.layers:
            ins.append(x)
            x = layer(x, **kw)
            outs.append(x)
        return ins, outs, kw

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        ins, outs, kw = self.teacher_layers(batch)
        layers = self.student.model.layers
        total = ins[0].new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(layers):
            if any(p.requires_grad for p in layer.parameters()):
                if self.student.model.recomputes(i):
                    y = checkpoint(lambda x, layer=layer: layer(x, **kw), ins[i], use_reentrant=False)
                else:
                    y = layer(ins[i], **kw)
                total = total + mse_sum(y, outs[i])
            else:
                with torch.no_grad():
                    term = mse_sum(layer(ins[i], **kw), outs[i])
                total = total + term
        return total * (self.mse_factor / len(layers)), {}


def load_pair(teacher_dir: str, student_dir: str, spec: StudentSpec) -> tuple[InfiniteVL, InfiniteVL, str]:
    """(teacher, student, directory holding the tokenizer)."""
    teacher = load_teacher(teacher_dir)
    if student_dir:
        student = InfiniteVL.from_pretrained(student_dir)
        if student.config.text.hidden_size != teacher.config.text.hidden_size or \
                student.config.text.num_hidden_layers != teacher.config.text.num_hidden_layers:
            raise ValueError(f"student {student_dir} does not have the teacher's shape: convert the teacher with "
                             f"`infinitevl convert` first")
        s, t = student.config, teacher.config
        fields = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        differ = [f"{k} {getattr(t, k)} vs {getattr(s, k)}" for k in fields if getattr(s, k) != getattr(t, k)]
        if s.text.vocab_size != t.text.vocab_size:
            differ.insert(0, f"vocab_size {t.text.vocab_size} vs {s.text.vocab_size}")
        if differ:
            raise ValueError(f"student {student_dir} does not share the teacher's vocabulary ({'; '.join(differ)}, "
                             f"teacher vs student): convert this teacher with `infinitevl convert` and use that")
        return teacher, student, student_dir
    return teacher, build_student(teacher, spec), teacher_dir


def pair_setup(stage: str, cfg, **objective) -> dict:
    """A distillation run's setup (loop.Trainer): teacher, student (or the spec it was converted with)."""
    return {"stage": stage, "teacher": runner.resolved(cfg.teacher), "student": runner.resolved(cfg.student),
            **({} if cfg.student else {"spec": dataclasses.asdict(cfg.spec)}), **objective}


def run(cfg: DistillLayerConfig, d=None) -> TrainResult:
    teacher, student, tok_dir = load_pair(cfg.teacher, cfg.student, cfg.spec)
    set_trainable(student, cfg.trainable)
    if not any(p.requires_grad for p in student.model.layers.parameters()):
        raise ValueError(f"trainable {cfg.trainable} selects nothing in the decoder layers, and layer-wise "
                         "distillation trains only those (each layer's output is pulled to the teacher's): use gdn "
                         "(the published set), attention or mlp")
    device = cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    teacher.to(device)
    return runner.train(LayerwiseObjective(student.train(), teacher, mse_factor=cfg.mse_factor),
                        model_config=student.config, init_dir=tok_dir, data=cfg.data, optim=cfg.optim, run=cfg.run,
                        d=d, setup=pair_setup("distill-layer", cfg, mse_factor=cfg.mse_factor))
