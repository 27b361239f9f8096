"""Stage 2: supervised fine-tuning on multimodal chat data.

Next-token cross-entropy on the assistant tokens (summed, divided by the step's target tokens).
The model may also be a transformers Qwen2.5-VL checkpoint: it is then trained in our code as an
all-attention model and written back in its own format (how the tiny task's teacher is trained).

Published trainable set: every parameter named like a GDN weight or q/k/v/o_proj, i.e. the GDN
mixers plus the kept attention layers' projections (`trainable: [gdn, attention]`); the vision
tower stays frozen. MLPs and the rest can be added through `trainable` (see params.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.infinitevl import InfiniteVL
from .data import DataConfig
from .loop import Objective, TrainResult
from .losses import cross_entropy_sum
from .options import OptimConfig, RunConfig
from .packing import PackedBatch
from .params import set_trainable
from .student import is_qwen2_5_vl, load_teacher, save_teacher
from . import runner


@dataclass
class SFTConfig:
    model: str = ""  # an InfiniteVL checkpoint directory (e.g. distill-e2e's final/) or a Qwen2.5-VL one
    # parameter groups (gdn, attention, mlp, ...) or name patterns that train (params.py)
    trainable: list[str] = field(default_factory=lambda: ["gdn", "attention"])
    loss_chunk: int = 4096  # positions per chunk of the head + cross-entropy
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/sft"))

    def __post_init__(self):
        if self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be >= 1 (positions per chunk of the head + cross-entropy), got "
                             f"{self.loss_chunk}")
        if not self.model:
            raise ValueError("model is empty: set it (model: DIR in the config, or --set model=DIR) "
                             "to an InfiniteVL checkpoint directory")


class CausalLMObjective(Objective):
    def __init__(self, student: InfiniteVL, *, chunk: int = 4096):
        super().__init__()
        self.student = student
        self.chunk = chunk

    def units(self, batch: PackedBatch) -> int:
        return batch.num_targets

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        hidden = self.student(**batch.model_inputs(), return_hidden=True)[0]
        loss = cross_entropy_sum(hidden, self.student.lm_head.weight, batch.targets[0], chunk=self.chunk,
                                 backend=getattr(self.student, "backend", "torch"))
        return loss, {}


def run(cfg: SFTConfig, d=None) -> TrainResult:
    qwen = is_qwen2_5_vl(cfg.model)
    model = load_teacher(cfg.model).requires_grad_(True) if qwen else InfiniteVL.from_pretrained(cfg.model)
    set_trainable(model.train(), cfg.trainable)
    return runner.train(CausalLMObjective(model, chunk=cfg.loss_chunk), model_config=model.config, init_dir=cfg.model,
                        data=cfg.data, optim=cfg.optim, run=cfg.run, d=d, save=save_teacher if qwen else None,
                        setup={"stage": "sft", "model": runner.resolved(cfg.model)})
