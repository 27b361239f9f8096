"""Gated DeltaNet token mixer (the linear-attention layer of InfiniteVL).

Legend: B batch, T tokens, D model dim, H heads, K key dim, V value dim, W conv width.

Parameter names match the released checkpoints exactly: q_proj, k_proj, v_proj, g_proj, a_proj,
b_proj, A_log, dt_bias, {q,k,v}_conv1d.weight [C, 1, W], o_norm.weight, o_proj.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.config import TextConfig
from ..model.state import GDNState
from ..ops import gated_delta
from ..ops.short_conv import short_conv, short_conv_packed
from .fuse import linear, project_together, train_fusable
from .norm import GatedRMSNorm


class ShortConv(nn.Module):
    """Holds a depthwise causal conv weight laid out as nn.Conv1d's ([C, 1, W]); SiLU after."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x_BTC, *, state=None, mask_BT=None, cu_seqlens=None, backend="torch"):
        """(y, new state). The fast single-token step advances `state` in place and returns it."""
        w = self.weight[:, 0, :]
        if backend == "fla":
            from ..ops import short_conv_fast as fast

            if torch.is_grad_enabled() and state is None and mask_BT is None and w.shape[-1] <= 4:  # training
                from ..ops import short_conv_train

                starts = short_conv_train.seq_starts(cu_seqlens, x_BTC.shape[1], x_BTC.device)
                return short_conv_train.short_conv(x_BTC, w, starts_T=starts), None
            if cu_seqlens is not None:
                return fast.short_conv_packed(x_BTC, w, cu_seqlens), None
            if x_BTC.shape[1] == 1 and state is not None and state.dtype == x_BTC.dtype:
                keep = None if mask_BT is None else mask_BT[:, 0]
                return fast.short_conv_step(x_BTC, w, state, keep_B=keep), state
            if mask_BT is None and x_BTC.shape[1] > 1:
                return fast.short_conv(x_BTC, w, state_BCW=state)
            # padded prefill, or one token on a state of another dtype: the reference
        if cu_seqlens is not None:
            return short_conv_packed(x_BTC, w, cu_seqlens), None
        return short_conv(x_BTC, w, state_BCW=state, mask_BT=mask_BT)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        D, H, K, V = config.hidden_size, config.num_linear_heads, config.linear_head_dim, config.linear_value_dim
        self.num_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * V, bias=False)
        self.g_proj = nn.Linear(D, H * V, bias=False)
        self.a_proj = nn.Linear(D, H, bias=False)
        self.b_proj = nn.Linear(D, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        # dt in [1e-3, 1e-1] log-uniform, stored as softplus^-1(dt) (Mamba-2 style init).
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.q_conv1d = ShortConv(H * K, config.conv_size)
        self.k_conv1d = ShortConv(H * K, config.conv_size)
        self.v_conv1d = ShortConv(H * V, config.conv_size)
        self.o_norm = GatedRMSNorm(V, eps=config.norm_eps)
        self.o_proj = nn.Linear(H * V, D, bias=False)
        self.backend = "torch"  # set by InfiniteVL.set_backend
        self.in_proj = None  # FusedLinears after fuse_projections()

    def siblings(self) -> list[nn.Linear]:
        """The projections of the same input that run as one matmul (fuse_projections, training's
        project_together), in the order forward unpacks them."""
        return [self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.a_proj, self.b_proj]

    def fuse_projections(self) -> None:
        """Inference: q, k, v, g, a, b in one matmul (see layers/fuse.py)."""
        from .fuse import FusedLinears

        if self.in_proj is None:
            self.in_proj = FusedLinears(self, "in_proj", self.siblings())

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        state: GDNState | None = None,
        mask_BT: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mixes tokens; updates `state` in place when given. Pad tokens (mask 0) leave it untouched."""
        B, T, _ = x_BTD.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        if self.in_proj is not None:
            q_in, k_in, v_in, g_in, a_in, b_in = self.in_proj(x_BTD, backend=self.backend)
        else:
            projs = self.siblings()
            if train_fusable(x_BTD, projs, self.backend):
                q_in, k_in, v_in, g_in, a_in, b_in = project_together(x_BTD, projs)
            else:  # module calls, so wrappers (LoRA adapters, hooks) apply
                q_in, k_in, v_in, g_in, a_in, b_in = (proj(x_BTD) for proj in projs)
        fast_convs = (self.backend == "fla" and state is not None and cu_seqlens is None
                      and state.conv_q.dtype == q_in.dtype)  # (autocast over float32 weights: the general path)
        if fast_convs and (T == 1 or (mask_BT is None and not torch.is_grad_enabled())):
            # decode, or a chunk continuing a state (a stream's frame): the three short convs in one kernel,
            # states advanced in place
            from ..ops import short_conv_fast

            weights = tuple(c.weight[:, 0, :] for c in (self.q_conv1d, self.k_conv1d, self.v_conv1d))
            cq, ck, cv = state.conv_q, state.conv_k, state.conv_v
            if T == 1:
                q, k, v = short_conv_fast.short_conv_step3(
                    (q_in, k_in, v_in), weights, (cq, ck, cv), keep_B=None if mask_BT is None else mask_BT[:, 0])
            else:
                q, k, v = short_conv_fast.short_conv_chunk3((q_in, k_in, v_in), weights, (cq, ck, cv))
        else:
            conv_kw = dict(mask_BT=mask_BT, cu_seqlens=cu_seqlens, backend=self.backend)
            q, cq = self.q_conv1d(q_in, state=None if state is None else state.conv_q, **conv_kw)
            k, ck = self.k_conv1d(k_in, state=None if state is None else state.conv_k, **conv_kw)
            v, cv = self.v_conv1d(v_in, state=None if state is None else state.conv_v, **conv_kw)
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)

        if self.backend == "fla" and torch.is_grad_enabled() and state is None and mask_BT is None:
            # training: the gates inside fla's chunk kernel, forward and backward
            from ..ops.gated_delta import fla as fla_rule

            cu = None if cu_seqlens is None else cu_seqlens.to(device=q.device, dtype=torch.long)
            o = fla_rule.chunk_gated_delta_rule_from_gates(q, k, v, a_in, b_in,
                                                           self.A_log, self.dt_bias, cu_seqlens=cu)
            return self._output(o, g_in, B, T)
        if self.backend == "fla" and not torch.is_grad_enabled():  # fused gates: forward only
            from ..ops import fused

            g, beta = fused.gdn_gates(a_in, b_in, self.A_log, self.dt_bias, mask_BT=mask_BT)
        else:
            beta = b_in.float().sigmoid()
            g = -self.A_log.float().exp() * F.softplus(a_in.float() + self.dt_bias.float())
            g, beta = gated_delta.mask_padding(g, beta, mask_BT)

        o, final = gated_delta.gated_delta_rule(
            q, k, v, g, beta,
            backend=self.backend,
            initial_state=None if state is None else state.recurrent,
            output_final_state=state is not None,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm=True,
        )
        if state is not None:
            for dst, src in ((state.conv_q, cq), (state.conv_k, ck), (state.conv_v, cv), (state.recurrent, final)):
                if src is not dst:  # the fast decode step already advanced it in place
                    dst.copy_(src)
        return self._output(o, g_in, B, T)

    def _output(self, o_BTHV: torch.Tensor, g_in: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """The gated norm of the rule's output, then o_proj."""
        H, V = self.num_heads, self.head_v_dim
        o = self.o_norm(o_BTHV, g_in.view(B, T, H, V)).reshape(B, T, H * V)
        if self.backend == "fla" and T == 1:  # decode: the Triton GEMV on the plain weight
            return linear(o, self.o_proj.weight, backend=self.backend)
        return self.o_proj(o)  # a module call, so wrappers (LoRA adapters, hooks) apply
