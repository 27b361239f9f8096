"""LoRA through PEFT on our model, and merging back into a plain checkpoint.

`add_lora` injects adapters into the named linear layers of the decoder (PEFT's LoraConfig with a
regex over module names) and freezes everything else; the returned module is still an `InfiniteVL`
(PEFT swaps the targeted nn.Linear for LoRA layers in place). `merge_lora` folds W + (alpha/r) B A
into each base weight and removes the adapters, giving a model whose state dict has exactly the
released names again.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from torch import nn

from ..model.infinitevl import InfiniteVL
from .params import expand


@dataclass
class LoRAConfig:
    r: int = 16  # adapter rank
    alpha: float = 32  # adapters are scaled by alpha / r
    dropout: float = 0.05  # on the adapters' input
    # Linear layers of the decoder that get adapters (module-name suffixes).
    targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj", "down_proj"])
    also_train: list[str] = field(default_factory=list)  # parameter groups/patterns trained in full (params.py)

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0 (the adapters are scaled by alpha / r), got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora.targets is empty: name at least one linear layer, e.g. q_proj")


def target_regex(targets: list[str]) -> str:
    return r"model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + r")"


def add_lora(model: InfiniteVL, cfg: LoRAConfig) -> InfiniteVL:
    """Injects LoRA adapters in place; only the adapters (and `also_train`) require grad afterwards."""
    from peft import LoraConfig, inject_adapter_in_model

    rx = re.compile(target_regex(cfg.targets))
    if not any(rx.fullmatch(n) for n, _ in model.named_modules()):
        raise ValueError(f"lora.targets {cfg.targets} match no decoder linear layer: use names such as q_proj, "
                         f"o_proj, gate_proj")
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=target_regex(cfg.targets), bias="none")
    for p in model.parameters():
        p.requires_grad_(False)
    model = inject_adapter_in_model(peft_cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    if cfg.also_train:
        pats = expand(model, cfg.also_train)
        for n, p in model.named_parameters():
            if any(fnmatch(n.replace(".base_layer", ""), q) for q in pats):
                p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every LoRA adapter into its base layer and puts the plain nn.Linear back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def merge_checkpoint(step_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """A long-sft training checkpoint (step-*: unmerged adapters, the LoRA settings in its trainer state) ->
    a plain released-format checkpoint in `out`, written beside it and moved into place when complete."""
    import torch
    from safetensors.torch import load_file

    from ..model.checkpoint import TIED_HEAD, output_dir, write_whole
    from ..model.config import InfiniteVLConfig
    from .checkpointing import STATE_FILE
    from .student import copy_processor_files

    step_dir = Path(step_dir)
    if not (step_dir / STATE_FILE).is_file() or not (step_dir / "model.safetensors").is_file():
        raise ValueError(f"{step_dir} is not a training checkpoint (needs {STATE_FILE} and model.safetensors): "
                         "give a step-* directory of a long-sft run")
    src, dst = step_dir.resolve(), Path(out).expanduser().resolve()
    if src == dst or src.is_relative_to(dst) or dst.is_relative_to(src):
        raise ValueError(f"--out {out} must be a directory outside the checkpoint and its run (not {step_dir}, a "
                         "folder holding it, or one inside it)")
    out = output_dir(out, overwrite=overwrite)
    try:
        state = torch.load(step_dir / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable state file gets the same answer
        raise ValueError(f"cannot read {step_dir / STATE_FILE} ({type(e).__name__}: {e})") from e
    lora = (state.get("trainer", {}).get("setup") or {}).get("lora")
    if lora is None:
        raise ValueError(f"{step_dir} records no LoRA settings: either it is not from a long-sft run (then it holds "
                         "no adapters: load it directly), or an earlier version wrote it (resume the run with its "
                         "config: its next checkpoint records them; or use the run's final/, which is merged)")
    config = InfiniteVLConfig.from_file(step_dir)
    model = add_lora(InfiniteVL(config), LoRAConfig(**lora))
    weights = load_file(str(step_dir / "model.safetensors"))
    if config.text.tie_word_embeddings:
        weights.setdefault(TIED_HEAD, weights["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{step_dir}: the weights do not fit its LoRA settings ({len(missing)} missing, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    model = merge_lora(model)

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        copy_processor_files(step_dir, folder)

    write_whole(out, fill)
    return out


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())
