"""Sequence packing: several samples in one row, kept apart by `cu_seqlens`.

Legend: T tokens of the row, S samples.

Every sample keeps its own M-RoPE positions (computed per sample, then concatenated), its GDN
state starts from zero at its first token and its sliding-window attention never looks into the
previous sample (the model honours `cu_seqlens` in both mixers). Targets are shifted inside each
sample, so the last token of a sample never learns to predict the first of the next one: a packed
row gives the same per-token losses as the samples run one by one.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..ops.rope import VisionTokens, get_rope_index
from .data import IGNORE, Sample


_CONCAT_DIM = {"input_ids": 1, "targets": 1, "position_ids": 2}  # the token axis; media tensors: dim 0


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T]
    targets: torch.Tensor  # [1, T]: the token each position must predict (-100: none)
    position_ids: torch.Tensor  # [3, 1, T]
    cu_seqlens: torch.Tensor  # [S + 1] int32
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device) -> "PackedBatch":
        return PackedBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                              for f in fields(self)})

    @classmethod
    def concat(cls, batches: list["PackedBatch"]) -> "PackedBatch":
        """Several packed rows as one (their samples side by side, still kept apart by cu_seqlens): one forward
        over all of them gives each sample the same computation as its own row did."""
        if len(batches) == 1:
            return batches[0]
        offsets, total = [], 0
        for b in batches:
            offsets.append(total)
            total += b.num_tokens
        cu = torch.cat([batches[0].cu_seqlens[:1]] + [b.cu_seqlens[1:] + o for b, o in zip(batches, offsets)])
        out = {"cu_seqlens": cu.to(batches[0].cu_seqlens.dtype)}
        for f in fields(cls):  # every other field: token-axis tensors along tokens, media along their first dim
            if f.name == "cu_seqlens":
                continue
            parts = [getattr(b, f.name) for b in batches if getattr(b, f.name) is not None]
            out[f.name] = torch.cat(parts, _CONCAT_DIM.get(f.name, 0)) if parts else None
        return cls(**out)

    def model_inputs(self) -> dict:
        """Keyword arguments for `InfiniteVL.forward`."""
        out = dict(input_ids=self.input_ids, position_ids=self.position_ids, cu_seqlens=self.cu_seqlens)
        for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out


def shifted_targets(labels_T: torch.Tensor) -> torch.Tensor:
    """targets[t] = labels[t + 1]; the last position predicts nothing."""
    return torch.cat([labels_T[1:], labels_T.new_full((1,), IGNORE)])


def sample_positions(s: Sample, vision_tokens: VisionTokens) -> torch.Tensor:
    pos, _ = get_rope_index(s.input_ids[None], vision_tokens, image_grid_thw=s.image_grid_thw,
                            video_grid_thw=s.video_grid_thw, second_per_grid_ts=s.second_per_grid_ts)
    return pos  # [3, 1, T]


def pack(samples: list[Sample], vision_tokens: VisionTokens) -> PackedBatch:
    """One row holding `samples` back to back."""
    assert samples, "pack needs at least one sample"

    def cat(name):
        parts = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        return torch.cat(parts) if parts else None

    lengths = torch.tensor([len(s) for s in samples])
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return PackedBatch(
        input_ids=torch.cat([s.input_ids for s in samples])[None],
        targets=torch.cat([shifted_targets(s.labels) for s in samples])[None],
        position_ids=torch.cat([sample_positions(s, vision_tokens) for s in samples], dim=-1),
        cu_seqlens=cu,
        pixel_values=cat("pixel_values"), image_grid_thw=cat("image_grid_thw"),
        pixel_values_videos=cat("pixel_values_videos"), video_grid_thw=cat("video_grid_thw"),
        second_per_grid_ts=cat("second_per_grid_ts"),
    )


def plan_rows(order: list[int], lengths: list[int | None], budget: int) -> list[list[int]]:
    """Greedy packing in the given order: a row closes when the next sample would exceed `budget`
    tokens. Samples with no length (bad) are left out; a sample longer than the budget gets a row of its own."""
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        if n is None:
            continue
        if cur and used + n > budget:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows
