"""A plain generation loop on the model's explicit state: prefill (optionally in chunks), then one
token at a time. Works on CPU and GPU; the CUDA-graph engine builds on the same two steps.

Legend: B batch, T prompt tokens, N new tokens.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from ..model.infinitevl import InfiniteVL
from ..model.state import InferenceState
from .request import check_rows, check_state, decode_options, prompt_inputs, request_options, whole_number
from .sampling import SamplingParams, sample


@torch.no_grad()
def prefill(
    model: InfiniteVL,
    input_ids_BT: torch.Tensor,
    *,
    state: InferenceState | None = None,
    attention_mask_BT: torch.Tensor | None = None,
    chunk_size: int | None = None,
    **vision,
) -> tuple[torch.Tensor, InferenceState]:
    """Consumes a prompt and returns (last-position logits [B, V], state).

    With `chunk_size`, the text is fed in chunks that continue the state; positions are computed on the
    whole prompt first, so an image may straddle a chunk boundary. Memory then stays bounded by the chunk.
    The processor's output can be passed whole; padding may be on either side.
    """
    input_ids_BT, attention_mask_BT, vision = prompt_inputs(input_ids_BT, attention_mask_BT, vision)
    check_state(state, input_ids_BT.shape[0])
    check_rows(attention_mask_BT)
    if chunk_size is not None:
        chunk_size = whole_number(chunk_size, "chunk_size", 1)
    return feed_prompt(model, input_ids_BT, state=state, attention_mask_BT=attention_mask_BT, chunk_size=chunk_size,
                    **vision)


def feed_prompt(model: InfiniteVL, input_ids_BT: torch.Tensor, *, state: InferenceState | None,
                attention_mask_BT: torch.Tensor | None, chunk_size: int | None, **vision
                ) -> tuple[torch.Tensor, InferenceState]:
    """`prefill` on arguments already checked (by `prompt_inputs`, `check_state`, `check_rows`)."""
    if state is None:
        state = model.new_state(input_ids_BT.shape[0])
    for logits in prompt_chunks(model, input_ids_BT, state=state, attention_mask_BT=attention_mask_BT,
                                chunk_size=chunk_size, **vision):
        pass
    return logits, state


def prompt_chunks(model: InfiniteVL, input_ids_BT: torch.Tensor, *, state: InferenceState,
                  attention_mask_BT: torch.Tensor | None, chunk_size: int | None, **vision) -> Iterator[torch.Tensor]:
    """Feeds a checked prompt into `state` one chunk per next(), yielding the chunk's last logits [B, V]
    (the last yield is the prompt's). Positions are computed on the whole prompt at the first next(), so an
    image may straddle a chunk boundary; vision features as the chunks reach them (`ChunkFeatures`). Whoever
    drives it can do other work between chunks (the scheduler decodes other rows)."""
    T = input_ids_BT.shape[1]
    positions, _ = model.positions(
        input_ids_BT, image_grid_thw=vision.get("image_grid_thw"), video_grid_thw=vision.get("video_grid_thw"),
        second_per_grid_ts=vision.get("second_per_grid_ts"), attention_mask_BT=attention_mask_BT,
        start_B=state.next_position,
    )
    if chunk_size is None or chunk_size >= T:
        yield model(input_ids_BT, attention_mask=attention_mask_BT, position_ids=positions, state=state,
                    logits_to_keep=1, **_vision_only(vision))[:, -1]
        return
    # The embeddings chunk by chunk, each image's (each video frame's) features computed when a chunk reaches it.
    features = ChunkFeatures(model, input_ids_BT, **_vision_only(vision, with_ts=False))
    for s in range(0, T, chunk_size):
        e = min(T, s + chunk_size)
        mask = None if attention_mask_BT is None else attention_mask_BT[:, s:e]
        yield model(inputs_embeds=features.embed(s, e), attention_mask=mask, position_ids=positions[:, :, s:e],
                    state=state, logits_to_keep=1)[:, -1]


class ChunkFeatures:
    """A chunked prompt's embeddings, column range by column range, with the vision features of the placeholders
    in it. The vision tower runs unit by unit as chunks reach them (an image; a video one temporal patch at a
    time, its frames being independent in the tower), so a long video's tower time is spread over the chunks
    too; a unit's features are kept until the chunks have used them all. The values of `InfiniteVL.embed` up to
    float rounding (the tower's matmuls see fewer rows at a time). Placeholder bookkeeping stays on the host:
    no device syncs per chunk."""

    def __init__(self, model: InfiniteVL, input_ids_BT: torch.Tensor, **vision):
        self.model, self.ids = model, input_ids_BT
        m2 = model.config.vision.spatial_merge_size ** 2
        self.kinds = []
        for slots, pixels, grid in model.vision_inputs(input_ids_BT, **vision):
            units, row = [], 0  # (first pixel row, pixel rows, h, w) of each image / video temporal patch
            for t, h, w in grid.tolist():
                for _ in range(t):
                    units.append((row, h * w, h, w))
                    row += h * w
            counts = torch.tensor([n // m2 for _, n, _, _ in units])
            host = slots.cpu()
            self.kinds.append({
                "slots": slots, "host": host, "pixels": pixels, "units": units, "counts": counts.tolist(),
                "rank": host.flatten().long().cumsum(0).view_as(host) - 1,  # the placeholder's feature row
                "starts": counts.cumsum(0) - counts, "left": counts.tolist(), "cache": {},
            })

    def embed(self, s: int, e: int) -> torch.Tensor:
        """Embeddings of columns [s, e) [B, e - s, D]."""
        x = self.model.model.embed_tokens(self.ids[:, s:e])
        for k in self.kinds:
            ranks = k["rank"][:, s:e][k["host"][:, s:e]]  # in masked_scatter's (row-major) order
            if ranks.numel() == 0:
                continue
            unit = torch.searchsorted(k["starts"], ranks, right=True) - 1
            need, used = (u.tolist() for u in torch.unique(unit, return_counts=True))
            missing = [u for u in need if u not in k["cache"]]
            if missing:
                units = [k["units"][u] for u in missing]
                px = torch.cat([k["pixels"][first:first + n] for first, n, _, _ in units])
                feats = self.model.visual(px.to(x.device), torch.tensor([[1, h, w] for _, _, h, w in units]))
                # copies: a unit kept for a later chunk must not hold the whole call's output alive
                parts = feats.split([k["counts"][u] for u in missing])
                k["cache"].update((u, f.clone()) for u, f in zip(missing, parts))
            local = torch.cat([k["cache"][u] for u in need])  # the needed units' features, in unit order
            first_row = torch.tensor([0] + [k["counts"][u] for u in need[:-1]]).cumsum(0)
            position = torch.searchsorted(torch.tensor(need), unit)  # unit -> its place in `need`
            index = (ranks - k["starts"][unit] + first_row[position]).to(x.device)
            x = x.masked_scatter(k["slots"][:, s:e, None].expand_as(x), local[index].to(x.dtype))
            for u, n in zip(need, used):
                k["left"][u] -= n
                if k["left"][u] == 0:
                    del k["cache"][u]
        return x


def _vision_only(kw: dict, *, with_ts: bool = True) -> dict:
    keys = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]
    if with_ts:
        keys.append("second_per_grid_ts")
    return {k: kw[k] for k in keys if kw.get(k) is not None}


@torch.no_grad()
def generate(
    model: InfiniteVL,
    input_ids_BT: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    attention_mask_BT: torch.Tensor | None = None,
    sampling: SamplingParams = SamplingParams(),
    stop_token_ids: Iterable[int] | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    prefill_chunk_size: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    state: InferenceState | None = None,
    **vision,
) -> torch.Tensor:
    """New tokens [B, N] (N <= max_new_tokens). A row that produced a stop token is padded with
    `pad_token_id` afterwards; generation ends when every row stopped. `on_token` receives each new
    column [B] as it is produced (streaming). The processor's output can be passed whole (`**inputs`)."""
    input_ids_BT, attention_mask_BT, vision = prompt_inputs(input_ids_BT, attention_mask_BT, vision)
    stop_token_ids = request_options(max_new_tokens, sampling, stop_token_ids, prefill_chunk_size)
    pad_token_id = decode_options(pad_token_id, generator, on_token)
    check_state(state, input_ids_BT.shape[0])
    check_rows(attention_mask_BT)
    logits, state = feed_prompt(model, input_ids_BT, state=state, attention_mask_BT=attention_mask_BT,
                                chunk_size=prefill_chunk_size, **vision)
    B = input_ids_BT.shape[0]
    device = input_ids_BT.device
    stops = torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        tok = sample(logits, sampling, generator)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        done = done | torch.isin(tok, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(tok[:, None], attention_mask=(~done)[:, None].long(), state=state,
                       placeholders_as_text=True)[:, -1]
    return torch.stack(out, dim=1)
