"""What every stage does around its objective: data -> loader, trainer, final export.

The final export (`<output_dir>/final/`) is a plain released-format checkpoint (config.json +
model.safetensors + tokenizer/processor files) that the next stage, `infinitevl generate` or
`InfiniteVL.from_pretrained` can load.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..model.checkpoint import TIED_HEAD
from ..model.infinitevl import InfiniteVL
from ..ops.rope import VisionTokens
from . import distributed
from .checkpointing import full_model_state
from .data import ChatDataset, DataConfig, chat_format_for, load_records
from .loader import RowLoader
from .loop import Objective, Trainer, TrainResult
from .options import OptimConfig, RunConfig, check_output_dir
from .student import copy_processor_files


def resolved(path: str | Path | None) -> str:
    """A directory as recorded in a run's setup: absolute, "" for none."""
    return str(Path(path).expanduser().resolve()) if path else ""


def build_loader(data: DataConfig, tokenizer_dir: str | Path, model_config, run: RunConfig,
                 d: distributed.Dist) -> RowLoader:
    fmt = chat_format_for(tokenizer_dir, model_config, data)
    dataset = ChatDataset(load_records(data, seed=run.seed), fmt, on_bad_sample=data.on_bad_sample, cache=data.cache)
    vt = VisionTokens(image_token_id=model_config.image_token_id, video_token_id=model_config.video_token_id,
                      spatial_merge_size=model_config.vision.spatial_merge_size,
                      tokens_per_second=model_config.vision.tokens_per_second)
    return RowLoader(dataset, vt, budget=data.row_tokens or data.max_tokens, accum=run.grad_accum, seed=run.seed,
                     rank=d.rank, world=d.world, workers=data.workers)


def train(objective: Objective, *, model_config, init_dir: str | Path, data: DataConfig, optim: OptimConfig,
          run: RunConfig, d: distributed.Dist | None = None, setup: dict | None = None,
          cpu_student: Callable[[], nn.Module] | None = None,
          finalize: Callable[[nn.Module], nn.Module] | None = None,
          save: Callable[[nn.Module, Path], None] | None = None) -> TrainResult:
    """Trains `objective` and, when the run completes, exports `<output_dir>/final`.

    setup: what the run starts from (see Trainer); a resume must match it.
    cpu_student builds an empty CPU module shaped like objective.student (for the export);
    finalize turns it into a plain InfiniteVL (e.g. merges LoRA); save writes it (default
    `save_pretrained`, the released InfiniteVL format)."""
    check_output_dir(run.output_dir)
    d = d or distributed.init(run.device)
    torch.manual_seed(run.seed)
    loader = build_loader(data, init_dir, model_config, run, d)
    trainer = Trainer(objective, loader, run=run, optim=optim, d=d, model_config=model_config,
                      init_dir=Path(init_dir), setup=setup)
    try:
        result = trainer.fit()
    finally:
        loader.close()
    if result.final_step == result.total_steps:
        export_final(trainer, Path(run.output_dir) / "final", init_dir=Path(init_dir),
                     cpu_student=cpu_student or (lambda: InfiniteVL(model_config)), finalize=finalize,
                     save=save or (lambda m, p: m.save_pretrained(p)))
    return result


def export_final(trainer: Trainer, out: Path, *, init_dir: Path, cpu_student: Callable[[], nn.Module],
                 finalize: Callable[[nn.Module], nn.Module] | None, save: Callable[[nn.Module, Path], None]) -> None:
    tied = trainer.model_config.text.tie_word_embeddings
    state = full_model_state(trainer.wrapped, prefix="student.", tied=False)  # all ranks take part
    if not trainer.d.main:
        distributed.barrier(trainer.d)
        return
    model = cpu_student()
    if tied:
        state[TIED_HEAD] = state.get(TIED_HEAD, state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing[:5], unexpected[:5])
    if finalize is not None:
        model = finalize(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, tmp)
    copy_processor_files(init_dir, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"[train] final model written to {out}", flush=True)
    distributed.barrier(trainer.d)
