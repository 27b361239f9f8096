"""Stage 3: long-context SFT with LoRA (the paper's "LongSFT" stage).

Same objective as stage 2 (cross-entropy on assistant tokens) on a mix of stage-2 data and long
videos/documents (list several sources under data.train, with `repeat` to weight them), rows up
to 32768 tokens. LoRA adapters (PEFT) on the decoder's linear layers train; at the end they are
merged into the base weights and `<output_dir>/final` is a plain checkpoint with the released names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..model.infinitevl import InfiniteVL
from . import runner
from .data import DataConfig
from .lora import LoRAConfig, add_lora, merge_lora
from .loop import TrainResult
from .options import OptimConfig, RunConfig
from .sft import CausalLMObjective


def _long_data() -> DataConfig:
    from .vision_inputs import VisionInputConfig

    return DataConfig(max_tokens=32768, vision=VisionInputConfig(video_max_frames=512))


@dataclass
class LongSFTConfig:
    model: str = ""  # the stage-2 output (an InfiniteVL checkpoint directory)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    loss_chunk: int = 4096  # positions per chunk of the head + cross-entropy
    data: DataConfig = field(default_factory=_long_data)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/long-sft"))

    def __post_init__(self):
        if self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be >= 1 (positions per chunk of the head + cross-entropy), got "
                             f"{self.loss_chunk}")
        if not self.model:
            raise ValueError("model is empty: set it (model: DIR in the config, or --set model=DIR) "
                             "to an InfiniteVL checkpoint directory (the SFT output)")


def run(cfg: LongSFTConfig, d=None) -> TrainResult:
    base = InfiniteVL.from_pretrained(cfg.model)
    config = base.config
    torch.manual_seed(cfg.run.seed)  # the adapters' init follows the run's seed
    model = add_lora(base, cfg.lora).train()
    return runner.train(
        CausalLMObjective(model, chunk=cfg.loss_chunk), model_config=config, init_dir=cfg.model, data=cfg.data,
        optim=cfg.optim, run=cfg.run, d=d, cpu_student=lambda: add_lora(InfiniteVL(config), cfg.lora),
        finalize=merge_lora, setup={"stage": "long-sft", "model": runner.resolved(cfg.model), "lora": asdict(cfg.lora)},
    )
