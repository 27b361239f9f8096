"""Training checkpoints: written atomically, restored exactly.

    <output_dir>/step-000120/   config.json + model.safetensors (a loadable model in the released
                                format; a LoRA run's holds the unmerged adapters: `infinitevl merge-lora`
                                makes it one) + the tokenizer/processor files + trainer_state.pt
                                (optimizer, scheduler, step, data position, per-rank RNG states)
    <output_dir>/latest         the name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp/` and renamed when complete, and `latest` is replaced
atomically afterwards, so a crash at any moment leaves the previous checkpoint usable. Model and
optimizer states go through torch.distributed.checkpoint's state-dict API with full (unsharded)
tensors, which works the same for a plain module, DDP and FSDP2.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from ..model.checkpoint import TIED_HEAD
from .distributed import Dist, barrier, gather_objects
from .student import copy_processor_files

STATE_FILE = "trainer_state.pt"
LATEST = "latest"


def rng_state() -> dict[str, Any]:
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def full_model_state(wrapped: torch.nn.Module, *, prefix: str, tied: bool) -> dict[str, torch.Tensor]:
    """Full float tensors of the submodule at `prefix` (e.g. "student."), on CPU (all ranks must call)."""
    sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if tied:
        out.pop(TIED_HEAD, None)
    # frozen weights kept in bf16 during the run (loop.store_frozen_in_bf16) are written in the trained weights'
    # dtype, so a checkpoint has one float dtype (lossless: their values are exact in bf16)
    floats = {v.dtype for v in out.values() if v.is_floating_point()}
    wide = max(floats, key=lambda t: torch.finfo(t).bits, default=None)
    return {k: (v.to(wide) if v.is_floating_point() and len(floats) > 1 else v).detach().contiguous()
            for k, v in out.items()}


def save(out_dir: Path, step: int, *, wrapped: torch.nn.Module, prefix: str, model_config, optimizer, scheduler,
         trainer: dict[str, Any], d: Dist, init_dir: Path | None, keep_last: int) -> Path | None:
    """Writes step-<step>/ (all ranks call; rank 0 writes). Returns the directory on rank 0."""
    tied = model_config.text.tie_word_embeddings
    weights = full_model_state(wrapped, prefix=prefix, tied=tied)
    osd = get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = gather_objects(rng_state(), d)
    final = out_dir / f"step-{step:06d}"
    if d.main:
        tmp = out_dir / f"step-{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            model_config.save(tmp)
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if init_dir is not None:
                copy_processor_files(init_dir, tmp)
            torch.save({"optimizer": osd, "scheduler": scheduler.state_dict(), "trainer": trainer, "rng": rngs,
                        "world": d.world}, tmp / STATE_FILE)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(out_dir).free if out_dir.exists() else 0
            last = latest(out_dir)
            raise ValueError(f"cannot write checkpoint step {step} to {out_dir} ({type(e).__name__}: {e}; "
                             f"{free / 2**30:.2f} GiB free there): free space or fix the folder's permissions, then "
                             f"run again to resume from {last if last else 'the start'}") from None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(out_dir / LATEST, final.name + "\n")
        _prune(out_dir, keep_last)
    barrier(d)
    return final if d.main else None


def _prune(out_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for p in _step_dirs(out_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def existing(out_dir: Path) -> list[str]:
    """Names of the checkpoints (and `latest`) in out_dir: what a new run there would prune or overwrite."""
    found = [p.name for p in _step_dirs(out_dir)]
    return found + ([LATEST] if (out_dir / LATEST).exists() else [])


def _step_dirs(out_dir: Path) -> list[Path]:
    """The written step-* checkpoint directories (complete or not), oldest first."""
    return sorted(p for p in out_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def _complete(p: Path) -> bool:
    return (p / STATE_FILE).exists() and (p / "model.safetensors").exists()


def latest(out_dir: Path) -> Path | None:
    """The checkpoint `latest` names; None when there is none. A `latest` naming a missing or incomplete
    checkpoint is an error (starting over would overwrite and prune the good ones)."""
    f = out_dir / LATEST
    if not f.exists():
        return None
    p = out_dir / f.read_text().strip()
    if not _complete(p):
        good = [q.name for q in _step_dirs(out_dir) if _complete(q)]
        fix = (f"point it at the newest complete one (echo {good[-1]} > {f})" if good else
               "no complete checkpoint is left")
        raise ValueError(f"{f} names {p.name}, which is missing or incomplete (needs {STATE_FILE} and "
                         f"model.safetensors): {fix}, or start over with a new run.output_dir")
    return p


def _damaged(path: Path, e: Exception) -> ValueError:
    return ValueError(f"checkpoint {path} is damaged ({type(e).__name__}: {e}): delete it and point "
                      f"{path.parent / LATEST} at an earlier step-* directory, or start over with a new run.output_dir")


def load(path: Path, *, wrapped: torch.nn.Module, prefix: str, tied: bool, optimizer, scheduler,
         d: Dist, check=None) -> dict[str, Any]:
    """Restores model, optimizer, scheduler and this rank's RNG from `path`; returns the trainer dict.
    `check(trainer dict)` runs first and may refuse the checkpoint (a ValueError) before anything is restored."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        weights = {prefix + k: v for k, v in load_file(str(path / "model.safetensors")).items()}
    except (EOFError, pickle.UnpicklingError, SafetensorError, RuntimeError) as e:  # truncated or corrupt files
        raise _damaged(path, e) from e
    except (ImportError, AttributeError, OSError) as e:  # the environment, not the files (e.g. another numpy)
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}): the files look whole; resume "
                         "with the package versions that wrote it") from e
    if state["world"] != d.world:
        raise ValueError(
            f"{path} was written by {state['world']} processes but this run has {d.world}: resume with the same "
            f"number of processes (the data split and RNG states depend on it)")
    if check is not None:
        check(state["trainer"])
    if tied:
        weights[prefix + TIED_HEAD] = weights[prefix + "model.embed_tokens.weight"]
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(wrapped, weights, options=opts)
    set_optimizer_state_dict(wrapped, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][d.rank])
    return state["trainer"]
