"""Stage 1b: end-to-end distillation (the published EndtoEndDistillationTrainer).

loss = T^2 * KL(softmax(teacher / T) || softmax(student / T)), T = 2, on every position of the row
(the published loss also used every position). Only the GDN mixers train.

Reduction: the published code used nn.KLDivLoss(reduction="batchmean") on [batch, tokens, vocab]
logits with one sample per device, i.e. the KL summed over a sample's tokens. `kl_reduction:
sequence` reproduces that (sum over tokens / samples); the default `token` divides by the number
of positions instead, which keeps the loss scale independent of sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.infinitevl import InfiniteVL
from . import runner
from .data import IGNORE, DataConfig
from .distill_layer import load_pair, pair_setup
from .loop import Objective, TrainResult
from .losses import kl_sum
from .options import OptimConfig, RunConfig
from .packing import PackedBatch
from .params import set_trainable
from .student import StudentSpec


@dataclass
class DistillE2EConfig:
    teacher: str = ""  # transformers Qwen2.5-VL checkpoint directory
    student: str = ""  # stage-1a output (<output_dir>/final); empty: convert the teacher with `spec`
    spec: StudentSpec = field(default_factory=StudentSpec)
    temperature: float = 2.0  # KL(teacher || student) at this temperature, times its square
    kl_reduction: str = "token"  # token | sequence (published batchmean, one sample per row)
    positions: str = "all"  # all | targets (only positions that predict an assistant token)
    trainable: list[str] = field(default_factory=lambda: ["gdn"])  # parameter groups or name patterns (params.py)
    chunk: int = 2048  # positions per chunk of the heads + KL
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/distill-e2e"))

    def __post_init__(self):
        if not self.teacher:
            raise ValueError("teacher is empty: set it (teacher: DIR in the config, or --set teacher=DIR) "
                             "to a transformers Qwen2.5-VL checkpoint directory")
        if self.kl_reduction not in ("token", "sequence"):
            raise ValueError(f"kl_reduction must be 'token' or 'sequence', got {self.kl_reduction!r}")
        if self.positions not in ("all", "targets"):
            raise ValueError(f"positions must be 'all' or 'targets', got {self.positions!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class KLObjective(Objective):
    def __init__(self, student: InfiniteVL, teacher: InfiniteVL, *, temperature: float = 2.0,
                 reduction: str = "token", positions: str = "all", chunk: int = 2048):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)
        self.temperature, self.reduction, self.positions, self.chunk = temperature, reduction, positions, chunk

    def _mask(self, batch: PackedBatch) -> torch.Tensor:
        if self.positions == "targets":
            return batch.targets[0] != IGNORE
        return torch.ones(batch.num_tokens, dtype=torch.bool, device=batch.input_ids.device)

    def units(self, batch: PackedBatch) -> int:
        if self.reduction == "sequence":
            return int(batch.cu_seqlens.numel() - 1)
        return int(self._mask(batch).sum())

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        inputs = batch.model_inputs()
        with torch.no_grad():
            th = self.teacher(**inputs, return_hidden=True)[0]
        sh = self.student(**inputs, return_hidden=True)[0]
        m = self._mask(batch)
        loss = kl_sum(sh[m], self.student.lm_head.weight, th[m], self.teacher.lm_head.weight,
                      temperature=self.temperature, chunk=self.chunk)
        return loss, {}


def run(cfg: DistillE2EConfig, d=None) -> TrainResult:
    teacher, student, tok_dir = load_pair(cfg.teacher, cfg.student, cfg.spec)
    set_trainable(student, cfg.trainable)
    device = cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    teacher.to(device)
    obj = KLObjective(student.train(), teacher, temperature=cfg.temperature, reduction=cfg.kl_reduction,
                      positions=cfg.positions, chunk=cfg.chunk)
    return runner.train(obj, model_config=student.config, init_dir=tok_dir, data=cfg.data, optim=cfg.optim,
                        run=cfg.run, d=d, setup=pair_setup("distill-e2e", cfg, temperature=cfg.temperature,
                                                           kl_reduction=cfg.kl_reduction, positions=cfg.positions))
