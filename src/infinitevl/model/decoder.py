"""The hybrid LLM decoder: pre-norm blocks whose token mixer is sliding-window attention or
Gated DeltaNet (per `layer_types`), each followed by a SwiGLU MLP.

Legend: B batch, T tokens, D model dim, E attention head dim.
Module names match the released checkpoints (`model.layers.N.self_attn...`, `model.norm`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers.gated_deltanet import GatedDeltaNet
from ..layers.mlp import SwiGLU
from ..layers.norm import RMSNorm
from ..layers.swa_attention import SlidingWindowAttention
from ..ops.rope import mrope_cos_sin, rope_inv_freq
from .config import TextConfig
from .state import InferenceState


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.self_attn: nn.Module = GatedDeltaNet(config)
        else:
            self.self_attn = SlidingWindowAttention(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x_BTD, pending_BTD=None, *, cos, sin, tok_idx, mask, state, cu_seqlens, seg,
                seq_lengths=None, unadded: bool = False):
        """The layer's output for input x (+ pending, when given). With unadded=True: (residual, update) whose
        sum is that output; the decoder leaves the last add to the next norm, which does it in the same kernel as
        the norm (forward and backward) on the fast backend. (Called as a module either way: FSDP's and PEFT's
        hooks see every call.)"""
        if pending_BTD is None:
            h = self.input_layernorm(x_BTD)
        else:
            x_BTD, h = self.input_layernorm.add_and_norm(x_BTD, pending_BTD)
        if self.layer_type == "linear_attention":
            h = self.self_attn(h, state=state, mask_BT=mask, cu_seqlens=cu_seqlens)
        else:
            h = self.self_attn(h, cos, sin, tok_idx_BT=tok_idx, mask_BT=mask, state=state, seg_BT=seg,
                               seq_lengths=seq_lengths)
        x_BTD, h = self.post_attention_layernorm.add_and_norm(x_BTD, h)
        if unadded:
            return x_BTD, self.mlp(h)
        return x_BTD + self.mlp(h)


class TextDecoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, kind) for kind in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        # with gradient_checkpointing: how many layers (the first ones) recompute their forward in backward;
        # None = all. The others keep their activations: less recompute work, more memory.
        self.recompute_layers: int | None = None

    def forward(
        self,
        x_BTD: torch.Tensor,
        position_ids_3BT: torch.Tensor,
        *,
        mask_BT: torch.Tensor | None = None,
        state: InferenceState | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs all layers over embeddings; returns the final-normed hidden states [B, T, D]."""
        shared = self.layer_inputs(x_BTD, position_ids_3BT, mask_BT=mask_BT, state=state, cu_seqlens=cu_seqlens)
        pending = None  # each layer's last residual add is done by the next norm (DecoderLayer.forward)
        for i, layer in enumerate(self.layers):
            kw = dict(shared, state=None if state is None else state.layers[i])
            if self.recomputes(i):
                x_BTD, pending = torch.utils.checkpoint.checkpoint(
                    lambda x, p, layer=layer, kw=kw: layer(x, p, unadded=True, **kw), x_BTD, pending,
                    use_reentrant=False)
            else:
                x_BTD, pending = layer(x_BTD, pending, unadded=True, **kw)
        if pending is None:
            return self.norm(x_BTD)
        return self.norm.add_and_norm(x_BTD, pending)[1]

    def recomputes(self, i: int) -> bool:
        """Whether layer i runs under activation checkpointing (training with gradient_checkpointing on)."""
        if not (self.gradient_checkpointing and self.training):
            return False
        return self.recompute_layers is None or i < self.recompute_layers

    def layer_inputs(self, x_BTD: torch.Tensor, position_ids_3BT: torch.Tensor, *, mask_BT=None, state=None,
                     cu_seqlens=None) -> dict:
        """What every layer takes besides its own state, computed once per forward: rotary tables, token
        indices, packed segments and lengths. cu_seqlens becomes one int64 tensor on the input's device for all
        layers: fla caches what it derives from it (chunk indices, a device sync each) by tensor identity."""
        B, T, _ = x_BTD.shape
        inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, device=x_BTD.device)
        cos, sin = mrope_cos_sin(position_ids_3BT, inv_freq, self.config.mrope_section)
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(device=x_BTD.device, dtype=torch.long)
        tok_idx, seg = token_indices(B, T, x_BTD.device, mask_BT=mask_BT, state=state, cu_seqlens=cu_seqlens)
        return dict(cos=cos, sin=sin, tok_idx=tok_idx, mask=mask_BT, cu_seqlens=cu_seqlens, seg=seg,
                    seq_lengths=None if cu_seqlens is None else packed_lengths(cu_seqlens))


def packed_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """The packed sequences' lengths as host ints (one device sync per forward, not one per layer)."""
    return [int(n) for n in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()]


def token_indices(B, T, device, *, mask_BT=None, state=None, cu_seqlens=None):
    """Per token: its index among the real tokens of its row (or packed sequence), and the packed
    sequence id (None when not packed). These drive the attention window, never positions."""
    if cu_seqlens is not None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths.to(device))[None]
        starts = cu_seqlens[:-1].to(device)[seg]
        return torch.arange(T, device=device)[None] - starts, seg
    if mask_BT is None:
        idx = torch.arange(T, device=device)[None].expand(B, T)
    else:
        idx = mask_BT.long().cumsum(-1) - 1
    if state is not None:
        idx = idx + state.seen[:, None]
    return idx, None
