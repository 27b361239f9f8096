"""InfiniteVL: the Qwen2.5-VL vision encoder feeding the hybrid SWA + Gated DeltaNet decoder.

Legend: B batch, T tokens, D model dim, M vision features.

`forward` consumes a chunk of tokens (with the images/videos whose placeholders it holds),
continues from `state` when one is given (updating it in place) and returns logits. Calling it
once on a prompt, or several times on consecutive chunks with the same state, computes the same
function.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..ops.backend import log, resolve_backend
from ..ops.rope import VisionTokens, get_rope_index
from . import checkpoint
from .config import InfiniteVLConfig
from .decoder import TextDecoder
from .state import InferenceState
from .vision import VisionTransformer

# The vision inputs a forward takes (the names the Qwen2.5-VL processor gives them).
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A floating dtype for the weights (a torch.dtype or its name), or a ValueError listing the choices."""
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype!r} is not one the model runs in: use torch.bfloat16, torch.float16 or "
                         "torch.float32 (or their names)")
    return dtype


def check_input_ids(input_ids) -> None:
    """A ValueError unless `input_ids` is an integer tensor [batch, tokens]."""
    if not torch.is_tensor(input_ids) or input_ids.is_floating_point() or input_ids.is_complex() \
            or input_ids.dtype == torch.bool:
        got = f"a {input_ids.dtype} tensor" if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor [batch, tokens], got {got}: e.g. torch.tensor([ids]) "
                         "for one prompt")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}: use input_ids[None] "
                         "for a single prompt")


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device this machine has, or a ValueError saying what to give instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is usable here (torch {torch.__version__}); "
                             "use cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: the model runs on cpu, cuda (cuda:N) or mps, not on {dev.type}")
    return dev


class InfiniteVL(nn.Module):
    def __init__(self, config: InfiniteVLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.model = TextDecoder(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.backend = "torch"  # the decoder's kernels as set_backend resolved them (the training loss reads it)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.vision_tokens = VisionTokens(
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            spatial_merge_size=config.vision.spatial_merge_size,
            tokens_per_second=config.vision.tokens_per_second,
        )

    # ---- construction / IO ----
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu") -> "InfiniteVL":
        device = check_device(device)
        dtype = check_dtype(dtype)
        config = InfiniteVLConfig.from_file(path)
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device).to(dtype)
        checkpoint.load_into(model, checkpoint.read_weights(path), tied=config.text.tie_word_embeddings)
        if config.text.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.config.save(path)
        checkpoint.save_weights(self, path, tied=self.config.text.tie_word_embeddings)

    def set_backend(self, backend: str = "auto", *, vision: bool = False) -> str:
        """Chooses the decoder's kernels once: 'torch' (the references), 'fla' (GPU fast paths) or 'auto'
        (fla on CUDA when installed). Returns the resolved name. The vision tower runs PyTorch unless
        `vision=True` (streaming): then its norms and MLP take the fused kernels too (inference only)."""
        resolved = resolve_backend(backend, self.lm_head.weight.device)
        self.backend = resolved
        for module in self.model.modules():
            if hasattr(module, "backend"):
                module.backend = resolved
        for module in self.visual.modules():
            if hasattr(module, "backend"):
                module.backend = resolved if vision else "torch"
        if resolved != getattr(self, "_backend_logged", None):
            log.info("infinitevl decoder backend: %s", resolved)
            self._backend_logged = resolved
        return resolved

    def fuse_projections(self, *, vision: bool = False) -> None:
        """Inference only: each decoder layer's sibling projections become one matmul (weights turn into views
        of one tensor; same values and names, no extra memory). Save checkpoints from an unfused model.
        `vision=True`: the vision MLPs' gate/up too."""
        for root in (self.model, self.visual) if vision else (self.model,):
            for module in root.modules():
                if module is not root and hasattr(module, "fuse_projections"):
                    module.fuse_projections()

    def new_state(self, batch_size: int) -> InferenceState:
        p = self.model.embed_tokens.weight
        return InferenceState.allocate(self.config.text, batch_size, dtype=p.dtype, device=p.device)

    # ---- forward ----
    def embed(
        self,
        input_ids_BT: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        placeholders_as_text: bool = False,
    ) -> torch.Tensor:
        """Token embeddings with the vision features written over the image/video placeholders.
        Placeholders without pixels are an error, unless `placeholders_as_text` (a generated token)."""
        x = self.model.embed_tokens(input_ids_BT)
        for slots, pixels, grid in self.vision_inputs(
                input_ids_BT, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                placeholders_as_text=placeholders_as_text):
            feats = self.visual(pixels.to(x.device), grid)
            x = x.masked_scatter(slots[..., None].expand_as(x), feats.to(x.dtype))
        return x

    def vision_inputs(self, input_ids_BT: torch.Tensor, *, placeholders_as_text: bool = False,
                      **vision) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(placeholder mask [B, T], pixels, grids [n, 3] on CPU) of the images, then the videos, that have pixels
        (`embed`'s pixel and grid keywords); checked against each other before the vision tower runs (a ValueError
        names the mismatch)."""
        out = []
        m2 = self.config.vision.spatial_merge_size ** 2
        for name, pixels, grid, token in (
            ("image", vision.get("pixel_values"), vision.get("image_grid_thw"), self.config.image_token_id),
            ("video", vision.get("pixel_values_videos"), vision.get("video_grid_thw"), self.config.video_token_id),
        ):
            slots = input_ids_BT == token
            n_slots = int(slots.sum())
            if pixels is None:
                if n_slots and not placeholders_as_text:
                    raise ValueError(
                        f"the input has {n_slots} {name} placeholder tokens but no {name} pixels were given: "
                        f"pass the processor's outputs for the {name}(s)"
                    )
                continue
            if grid is None:
                raise ValueError(f"{name} pixels were given without {name}_grid_thw: pass both from the processor")
            grid = self.visual.check_inputs(pixels, grid, f"{name}_grid_thw")
            n_feats = int(grid.prod(-1).sum()) // m2
            if n_feats != n_slots:
                raise ValueError(
                    f"{name} features and {name} tokens do not match: {n_slots} placeholder tokens in the text, "
                    f"{n_feats} features from {name}_grid_thw {grid.tolist()}. Expand each "
                    f"{name} token to grid_t*grid_h*grid_w/{m2} pads (the processor does this)"
                )
            out.append((slots, pixels, grid))
        return out

    def positions(
        self,
        input_ids_BT: torch.Tensor,
        *,
        image_grid_thw=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        attention_mask_BT=None,
        start_B: torch.Tensor | None = None,
        placeholders_as_text: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE position ids [3, B, T] and the next free position [B]."""
        return get_rope_index(
            input_ids_BT, self.vision_tokens, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, attention_mask_BT=attention_mask_BT, start_BT=start_B,
            placeholders_as_text=placeholders_as_text,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        state: InferenceState | None = None,
        cu_seqlens: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        placeholders_as_text: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T', vocab] for the last `logits_to_keep` tokens (0 = all).

        attention_mask [B, T]: 1 real, 0 padding (any layout). Pad tokens change nothing in `state`.
        position_ids [3, B, T] (or [B, T] for text) override the computed M-RoPE positions.
        cu_seqlens: packed sequences in one row (training); needs state=None.
        placeholders_as_text: the tokens were generated (a decode step): an image or video placeholder id among
        them is text. In a prompt (the default) a placeholder without pixels is an error (a forgotten image).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            check_input_ids(input_ids)
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref.ndim < 2:
            raise ValueError(f"inputs_embeds must be [batch, tokens, hidden], got shape {tuple(ref.shape)}")
        B, T = ref.shape[:2]
        if T == 0:
            raise ValueError("empty input: give at least one token")
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be a whole number >= 0 (0 = all), got {logits_to_keep!r}")
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must be [{B}, {T}] like input_ids, got {tuple(attention_mask.shape)}")
            if bool(attention_mask.all()):
                attention_mask = None
        if state is not None and state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} rows but the input has {B}: allocate a matching state")
        if cu_seqlens is not None:
            if state is not None or B != 1 or attention_mask is not None:
                raise ValueError("cu_seqlens (packed rows) needs batch 1, no attention_mask and no state")
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
                raise ValueError(f"cu_seqlens must start at 0 and end at the token count {T}")
        if input_ids is not None:
            vocab = self.config.text.vocab_size
            if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
                raise ValueError(f"token ids must lie in [0, {vocab}); got {int(input_ids.min())}..{int(input_ids.max())}")
            x = self.embed(input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                           pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                           placeholders_as_text=placeholders_as_text)
        else:
            x = inputs_embeds

        if position_ids is None:
            if input_ids is None:
                raise ValueError("with inputs_embeds, pass position_ids too")
            if cu_seqlens is not None:
                position_ids = _packed_text_positions(cu_seqlens, T, x.device)
            else:
                position_ids, nxt = self.positions(
                    input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                    second_per_grid_ts=second_per_grid_ts, attention_mask_BT=attention_mask,
                    start_B=None if state is None else state.next_position,
                    placeholders_as_text=placeholders_as_text,
                )
        else:
            if position_ids.ndim == 2:
                position_ids = position_ids[None].expand(3, -1, -1)
            if position_ids.shape != (3, B, T):
                raise ValueError(f"position_ids must be [3, {B}, {T}] (or [{B}, {T}]), got {tuple(position_ids.shape)}")
            nxt = None
        if state is not None:
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask.bool()
            if nxt is None:
                nxt = position_ids.amax(0).masked_fill(~valid, -1).amax(-1) + 1
            has_tokens = valid.any(-1)

        hidden = self.model(x, position_ids.to(x.device), mask_BT=attention_mask, state=state, cu_seqlens=cu_seqlens)
        if state is not None:
            state.seen += valid.sum(-1)
            state.next_position.copy_(torch.where(has_tokens, nxt.to(state.next_position.device),
                                                  state.next_position))
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if return_hidden:
            return hidden
        return self.lm_head(hidden)


def _packed_text_positions(cu_seqlens: torch.Tensor, T: int, device) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    starts = torch.repeat_interleave(cu_seqlens[:-1].to(device), lengths)
    pos = torch.arange(T, device=device) - starts
    return pos.view(1, 1, T).expand(3, 1, T)
