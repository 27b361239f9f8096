"""Explicit inference state: everything the model remembers between calls, with a fixed size.

Legend: B batch, C conv channels, W conv width, H heads, K key dim, V value dim,
R ring slots (window - 1), G kv heads, D head dim.

- Gated DeltaNet layer: the last W-1 inputs of each short conv, and the float32 recurrent state.
- Sliding-window layer: a ring buffer of the last R = window - 1 keys and values (the current token
  makes the window complete) and the token index held by each slot (-1 = empty).
- Per row: how many real tokens were consumed (`seen`), and the next M-RoPE position.
Nothing here grows with the number of tokens processed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .config import TextConfig


@dataclass
class GDNState:
    conv_q: torch.Tensor  # [B, C_q, W-1]
    conv_k: torch.Tensor  # [B, C_k, W-1]
    conv_v: torch.Tensor  # [B, C_v, W-1]
    recurrent: torch.Tensor  # [B, H, K, V] float32


@dataclass
class SWAState:
    keys: torch.Tensor  # [B, R, G, D]
    values: torch.Tensor  # [B, R, G, D]
    token_index: torch.Tensor  # [B, R] long, -1 where empty


def _tensors(obj):
    return [getattr(obj, f.name) for f in fields(obj)]


@dataclass
class InferenceState:
    layers: list[GDNState | SWAState]
    seen: torch.Tensor  # [B] long: real tokens consumed per row
    next_position: torch.Tensor  # [B] long: the M-RoPE position of the next text token

    @classmethod
    def allocate(
        cls, config: TextConfig, batch_size: int, *, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> "InferenceState":
        B, Wc = batch_size, config.conv_size - 1
        H, K, V = config.num_linear_heads, config.linear_head_dim, config.linear_value_dim
        R, G, D = config.sliding_window - 1, config.num_key_value_heads, config.head_dim
        layers: list[GDNState | SWAState] = []
        for kind in config.layer_types:
            if kind == "linear_attention":
                layers.append(GDNState(
                    conv_q=torch.zeros(B, H * K, Wc, dtype=dtype, device=device),
                    conv_k=torch.zeros(B, H * K, Wc, dtype=dtype, device=device),
                    conv_v=torch.zeros(B, H * V, Wc, dtype=dtype, device=device),
                    recurrent=torch.zeros(B, H, K, V, dtype=torch.float32, device=device),
                ))
            else:
                layers.append(SWAState(
                    keys=torch.zeros(B, R, G, D, dtype=dtype, device=device),
                    values=torch.zeros(B, R, G, D, dtype=dtype, device=device),
                    token_index=torch.full((B, R), -1, dtype=torch.long, device=device),
                ))
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        return cls(layers=layers, seen=zeros, next_position=zeros.clone())

    @property
    def batch_size(self) -> int:
        return self.seen.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        out = [self.seen, self.next_position]
        for layer in self.layers:
            out.extend(_tensors(layer))
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        """Back to the empty state, in place (buffers keep their addresses, e.g. for CUDA graphs)."""
        for layer in self.layers:
            for t in _tensors(layer):
                t.fill_(-1 if t.dtype == torch.long else 0)
        self.seen.zero_()
        self.next_position.zero_()

    def clone(self) -> "InferenceState":
        layers = [type(layer)(*[t.clone() for t in _tensors(layer)]) for layer in self.layers]
        return InferenceState(layers=layers, seen=self.seen.clone(), next_position=self.next_position.clone())

    def copy_(self, other: "InferenceState") -> None:
        """Overwrite this state with `other` in place (same shapes)."""
        for dst, src in zip(self.tensors(), other.tensors(), strict=True):
            dst.copy_(src)

    def rows(self, start: int, stop: int) -> "InferenceState":
        """A state whose tensors are views of rows start..stop-1 (writes go through; buffers keep their addresses)."""
        layers = [type(layer)(*[t[start:stop] for t in _tensors(layer)]) for layer in self.layers]
        return InferenceState(layers=layers, seen=self.seen[start:stop], next_position=self.next_position[start:stop])

    def select(self, rows: torch.Tensor | list[int]) -> "InferenceState":
        """A new state holding only the given batch rows."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.seen.device)
        layers = [type(layer)(*[t.index_select(0, rows) for t in _tensors(layer)]) for layer in self.layers]
        return InferenceState(layers=layers, seen=self.seen[rows], next_position=self.next_position[rows])
