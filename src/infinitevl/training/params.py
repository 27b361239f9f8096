"""Which parameters train: named groups of the hybrid model, or glob patterns over parameter names.

Groups (layer indices come from the model's `layer_types`):
    gdn        the Gated DeltaNet mixers (model.layers.<linear>.self_attn.*) — stages 1a/1b
    attention  the kept sliding-window attention mixers (model.layers.<swa>.self_attn.*)
    attention_proj  only their q/k/v/o projections (the published SFT set together with gdn)
    mlp        every decoder MLP;  norms  every decoder RMSNorm and the final norm
    embed      token embeddings (and the tied head);  vision  the ViT;  merger  its patch merger
    llm        the whole decoder;  all  everything
Anything else is an fnmatch pattern, e.g. "model.layers.*.mlp.down_proj.*".
"""
from __future__ import annotations

from fnmatch import fnmatch

from torch import nn

from ..model.infinitevl import InfiniteVL

GROUPS = ("gdn", "attention", "attention_proj", "mlp", "norms", "embed", "vision", "merger", "llm", "all")


def group_patterns(model: InfiniteVL, group: str) -> list[str]:
    kinds = model.config.text.layer_types
    gdn = [i for i, k in enumerate(kinds) if k == "linear_attention"]
    swa = [i for i, k in enumerate(kinds) if k == "sliding_attention"]
    return {
        "gdn": [f"model.layers.{i}.self_attn.*" for i in gdn],
        "attention": [f"model.layers.{i}.self_attn.*" for i in swa],
        "attention_proj": [f"model.layers.{i}.self_attn.{p}.*" for i in swa for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
        "mlp": ["model.layers.*.mlp.*"],
        "norms": ["model.layers.*.input_layernorm.*", "model.layers.*.post_attention_layernorm.*", "model.norm.*"],
        "embed": ["model.embed_tokens.*", "lm_head.*"],
        "vision": ["visual.*"],
        "merger": ["visual.merger.*"],
        "llm": ["model.*", "lm_head.*"],
        "all": ["*"],
    }[group]


def expand(model: InfiniteVL, selection: list[str] | str) -> list[str]:
    """Glob patterns for a selection of groups and/or patterns."""
    if isinstance(selection, str):
        selection = [selection]
    return [q for s in selection for q in (group_patterns(model, s) if s in GROUPS else [s])]


def set_trainable(model: InfiniteVL, selection: list[str]) -> list[str]:
    """Freezes every parameter, then unfreezes the selected ones; returns their names.
    Raises ValueError when the selection matches nothing."""
    patterns = expand(model, selection)
    names = []
    for name, p in model.named_parameters():
        on = any(fnmatch(name, pat) for pat in patterns)
        p.requires_grad_(on)
        if on:
            names.append(name)
    if not names:
        raise ValueError(f"trainable {selection} matches no parameter: use groups {GROUPS} or glob patterns over "
                         f"parameter names such as 'model.layers.*.mlp.*'")
    return names


def count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    seen, train, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return train, total
