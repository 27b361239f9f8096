"""Sliding-window GQA attention with M-RoPE (the attention layer of InfiniteVL).

Legend: B batch, T tokens, D model dim, H query heads, G kv heads, E head dim, R ring slots.
q/k/v carry a bias, o does not (Qwen2.5). Token indices (`tok_idx_BT`) count the real tokens of a
row; they decide the window, M-RoPE positions only rotate.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.config import TextConfig
from ..model.state import SWAState
from ..ops.rope import apply_rope
from .fuse import linear, project_together, train_fusable
from ..ops.swa import (causal_segments_attention, folded_gqa_attention, ring_write, ring_write_last,
                       sliding_window_attention, window_mask)


class SlidingWindowAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        D, H, G = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, config.head_dim
        self.window = config.sliding_window
        self.q_proj = nn.Linear(D, H * self.head_dim, bias=True)
        self.k_proj = nn.Linear(D, G * self.head_dim, bias=True)
        self.v_proj = nn.Linear(D, G * self.head_dim, bias=True)
        self.o_proj = nn.Linear(H * self.head_dim, D, bias=False)
        self.backend = "torch"  # set by InfiniteVL.set_backend
        self.qkv = None  # FusedLinears after fuse_projections()

    def siblings(self) -> list[nn.Linear]:
        """The projections of the same input that run as one matmul (fuse_projections, training's
        project_together), in the order forward unpacks them."""
        return [self.q_proj, self.k_proj, self.v_proj]

    def fuse_projections(self) -> None:
        """Inference: q, k, v in one matmul (see layers/fuse.py)."""
        from .fuse import FusedLinears

        if self.qkv is None:
            self.qkv = FusedLinears(self, "qkv", self.siblings())

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTE: torch.Tensor,
        sin_BTE: torch.Tensor,
        *,
        tok_idx_BT: torch.Tensor,
        mask_BT: torch.Tensor | None = None,
        state: SWAState | None = None,
        seg_BT: torch.Tensor | None = None,
        seq_lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """Attends within the window; when `state` is given, reads its ring buffer and then writes the
        last window-1 real tokens into it. `seg_BT` keeps packed sequences apart; `seq_lengths` (host ints,
        the packed lengths in order) lets sequences within the window skip the mask."""
        B, T, _ = x_BTD.shape
        H, G, E = self.num_heads, self.num_kv_heads, self.head_dim
        rope = apply_rope
        if self.backend == "fla" and not torch.is_grad_enabled():  # the Triton rope has no backward
            from ..ops import swa_fast

            rope = swa_fast.apply_rope
        if self.qkv is not None:
            q_in, k_in, v_in = self.qkv(x_BTD, backend=self.backend)
        else:
            projs = self.siblings()
            if train_fusable(x_BTD, projs, self.backend):
                q_in, k_in, v_in = project_together(x_BTD, projs)
            else:  # module calls, so wrappers (LoRA adapters, hooks) apply
                q_in, k_in, v_in = (proj(x_BTD) for proj in projs)
        q = rope(q_in.view(B, T, H, E), cos_BTE, sin_BTE)
        k = rope(k_in.view(B, T, G, E), cos_BTE, sin_BTE)
        v = v_in.view(B, T, G, E)
        if self.backend == "fla" and state is not None and T == 1 and seg_BT is None:
            # Decode: read the ring in place, then write this token into it (see ops/swa_fast.py).
            cur = tok_idx_BT[:, 0]
            o = swa_fast.decode_attention(q[:, 0], k[:, 0], v[:, 0], state.keys, state.values, state.token_index,
                                          cur, window=self.window, scale=E**-0.5)
            keep = None if mask_BT is None else mask_BT[:, 0].bool()
            swa_fast.ring_write_step(state, k[:, 0], v[:, 0], cur, keep_B=keep)
            return linear(o.reshape(B, T, H * E), self.o_proj.weight, backend=self.backend)

        if state is not None and seg_BT is not None:
            raise ValueError("packed sequences (cu_seqlens) are for stateless forwards: pass state=None")
        if (self.backend == "fla" and state is not None and mask_BT is None and not torch.is_grad_enabled()
                and 1 < T <= swa_fast.BLOCK_PREFILL_MAX_T and swa_fast.block_attention_supports(E, q.dtype)):
            # a stream's frame: the ring read in place (no concatenation, mask or kv repeat), then written
            o = swa_fast.block_attention(q, k, v, tok_idx_BT, state.keys, state.values, state.token_index,
                                         window=self.window, scale=E**-0.5)
            ring_write_last(state, k, v, tok_idx_BT)
            return self.o_proj(o.reshape(B, T, H * E))
        if state is None and mask_BT is None and (seg_BT is None or seq_lengths is not None):
            # stateless, no padding: sequences no longer than the window are plain causal attention
            lengths = [T] if seg_BT is None else list(seq_lengths)
            if max(lengths) <= self.window and (seg_BT is None or B == 1):
                o = causal_segments_attention(q, k, v, lengths, scale=E**-0.5)
                return self.o_proj(o.reshape(B, T, H * E))
        valid = torch.ones(B, T, dtype=torch.bool, device=x_BTD.device) if mask_BT is None else mask_BT.bool()
        if state is None:
            keys, values, k_idx, k_valid = k, v, tok_idx_BT, valid
        else:
            keys = torch.cat([state.keys.to(k.dtype), k], dim=1)
            values = torch.cat([state.values.to(v.dtype), v], dim=1)
            k_idx = torch.cat([state.token_index, tok_idx_BT], dim=1)
            k_valid = torch.cat([state.token_index >= 0, valid], dim=1)
        mask = window_mask(tok_idx_BT, k_idx, self.window, k_valid_BS=k_valid, q_seg_BT=seg_BT, k_seg_BS=seg_BT)
        if self.backend == "fla" and not torch.is_grad_enabled() and T < 4 * E and H > G:
            o = folded_gqa_attention(q, keys, values, mask, scale=E**-0.5)  # no [B, S, H, E] kv repeat
        else:
            o = sliding_window_attention(q, keys, values, mask, scale=E**-0.5)

        if state is not None and mask_BT is None and T > 1:
            # no padding: the last R tokens, chosen by shape (capturable; streaming frames take this path)
            ring_write_last(state, k, v, tok_idx_BT)
        elif state is not None:
            # Keep only what a later query can still see: the last R real tokens of each row.
            R = state.token_index.shape[1]
            last = (tok_idx_BT.masked_fill(~valid, -1)).amax(dim=1, keepdim=True)
            keep = valid & (tok_idx_BT > last - R) if T > 1 else valid
            ring_write(state, k, v, tok_idx_BT, keep)
        return self.o_proj(o.reshape(B, T, H * E))
