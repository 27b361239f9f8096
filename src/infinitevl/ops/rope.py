"""Rotary embeddings: 3D multimodal RoPE (M-RoPE) for the LLM and `get_rope_index` for its positions.

Legend: B batch, T tokens, D head dim, A = 3 position axes (temporal, height, width).
Text tokens advance all three axes together; an image or video block is laid out on a
(t, h, w) grid that starts at the next free position, and the text after it continues from
the block's largest position + 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def rope_inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def mrope_cos_sin(
    position_ids_ABT: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] in float32: channel block i of sizes `mrope_section * 2` uses axis i % 3."""
    freqs_ABTF = position_ids_ABT.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    emb_ABTD = torch.cat([freqs_ABTF, freqs_ABTF], dim=-1)
    sections = list(mrope_section) * 2
    if sum(sections) != emb_ABTD.shape[-1]:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {emb_ABTD.shape[-1] // 2}")
    parts = emb_ABTD.split(sections, dim=-1)
    emb_BTD = torch.cat([p[i % 3] for i, p in enumerate(parts)], dim=-1)
    return emb_BTD.cos(), emb_BTD.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BTHD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTD[:, :, None].to(x_BTHD.dtype), sin_BTD[:, :, None].to(x_BTHD.dtype)
    return x_BTHD * cos + rotate_half(x_BTHD) * sin


@dataclass(frozen=True)
class VisionTokens:
    """The token ids and grid rules `get_rope_index` needs (taken from the model config)."""

    image_token_id: int
    video_token_id: int
    spatial_merge_size: int = 2
    tokens_per_second: int = 2


def check_grid(grid, name: str = "grid_thw") -> torch.Tensor:
    """The grids as a [number of items, 3] CPU long tensor: (t, h, w) whole numbers >= 1 per image or video, as the
    processor returns them (a ValueError names `name` otherwise)."""
    g = torch.as_tensor(grid).detach().cpu()
    if g.ndim != 2 or g.shape[1] != 3 or bool((g < 1).any()) or bool((g != g.round()).any()):
        raise ValueError(f"{name} must be [number of items, 3]: (t, h, w) whole numbers >= 1 per image or video, "
                         f"as the processor returns it; got {g.tolist()}")
    return g.long()


def get_rope_index(
    input_ids_BT: torch.Tensor,
    spec: VisionTokens,
    *,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | list[float] | None = None,
    attention_mask_BT: torch.Tensor | None = None,
    start_BT: torch.Tensor | None = None,
    placeholders_as_text: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (position_ids [3, B, T], next_position [B]).

    Images and videos are consumed in order, row after row. Each run of image (video) pad tokens is
    one image (video) whose grid must give exactly that many tokens. Pad positions (mask 0) get 1.
    `start_BT` ([B]) continues positions from an earlier chunk (default 0).
    `placeholders_as_text`: placeholders of a kind with no grids are text (a generated token), not an error.
    """
    B, T = input_ids_BT.shape
    merge2 = spec.spatial_merge_size**2
    for name, grid in (("image_grid_thw", image_grid_thw), ("video_grid_thw", video_grid_thw)):
        if grid is not None:
            check_grid(grid, name)
    kinds = {spec.image_token_id: ("image", image_grid_thw), spec.video_token_id: ("video", video_grid_thw)}
    if placeholders_as_text:
        kinds = {tok: kg for tok, kg in kinds.items() if kg[1] is not None}
    vision_ids = torch.tensor(list(kinds), dtype=input_ids_BT.dtype)
    if second_per_grid_ts is not None:
        second_per_grid_ts = torch.as_tensor(second_per_grid_ts).tolist()
    position_ids = torch.ones(3, B, T, dtype=torch.long)
    next_position = torch.zeros(B, dtype=torch.long)
    used = {"image": 0, "video": 0}
    ids_cpu = input_ids_BT.detach().cpu()
    mask_cpu = None if attention_mask_BT is None else attention_mask_BT.detach().cpu().to(torch.bool)
    for b in range(B):
        cols = torch.arange(T) if mask_cpu is None else mask_cpu[b].nonzero().flatten()
        ids = ids_cpu[b, cols]
        n = len(ids)
        pos = torch.empty(3, n, dtype=torch.long)
        nxt = 0 if start_BT is None else int(start_BT[b])
        # runs of identical vision placeholder tokens: one image or video each
        is_vis = torch.isin(ids, vision_ids)
        starts = (is_vis & torch.cat([torch.tensor([True]), ids[1:] != ids[:-1]])).nonzero().flatten().tolist()
        i = 0
        for r in starts + [n]:
            if r > i:  # text before this run: all three axes advance together
                pos[:, i:r] = torch.arange(nxt, nxt + r - i)
                nxt += r - i
            if r == n:
                break
            tok = int(ids[r])
            j = r + 1
            while j < n and int(ids[j]) == tok:
                j += 1
            kind, grid_thw = kinds[tok]
            k = used[kind]
            if grid_thw is None or k >= len(grid_thw):
                raise ValueError(
                    f"the prompt has more {kind}s than {kind}_grid_thw rows ({0 if grid_thw is None else len(grid_thw)}): "
                    f"pass one grid per {kind}, as the processor returns them"
                )
            t, h, w = (int(x) for x in grid_thw[k])
            gh, gw = h // spec.spatial_merge_size, w // spec.spatial_merge_size
            n_tokens = t * h * w // merge2
            if j - r != n_tokens:
                raise ValueError(
                    f"{kind} {k} has {j - r} placeholder tokens in row {b} but its grid {t}x{h}x{w} gives "
                    f"{n_tokens} features: expand each {kind} token to grid_t*grid_h*grid_w/{merge2} pads "
                    f"(the processor does this)"
                )
            step = 0
            if kind == "video":
                sec = 1.0 if second_per_grid_ts is None else second_per_grid_ts[k]
                # The published code casts seconds-per-grid to an integer before scaling: keep that.
                step = int(sec) * spec.tokens_per_second
            tt = (torch.arange(t) * step).repeat_interleave(gh * gw)
            hh = torch.arange(gh).repeat_interleave(gw).repeat(t)
            ww = torch.arange(gw).repeat(t * gh)
            pos[:, r:j] = torch.stack([tt, hh, ww]) + nxt
            nxt = int(pos[:, r:j].max()) + 1
            used[kind] += 1
            i = j
        position_ids[:, b, cols] = pos
        next_position[b] = nxt
    for kind, grid_thw in (("image", image_grid_thw), ("video", video_grid_thw)):
        if grid_thw is not None and used[kind] != len(grid_thw):
            raise ValueError(
                f"{len(grid_thw)} {kind}(s) given but the prompt has {used[kind]} {kind} placeholder runs: "
                f"put one <|vision_start|><|{kind}_pad|><|vision_end|> per {kind} in the text"
            )
    dev = input_ids_BT.device
    return position_ids.to(dev), next_position.to(dev)
