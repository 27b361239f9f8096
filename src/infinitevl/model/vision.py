"""The Qwen2.5-VL vision encoder (InfiniteVL keeps it unchanged).

Legend: N patches, E vision width, H heads, F head dim, M merged tokens (N / merge^2), D LLM width.

Patches arrive flattened by the processor ([N, C * tp * p * p]) in "merge-group" order: the
merge x merge patches of one LLM token are consecutive. Blocks attend inside windows of
`window_size` pixels, except the `fullatt_block_indexes` blocks, which attend across one whole
image or video frame (never across frames or images). The 2x2 merger maps each group to one LLM token.
Parameter names match the released checkpoints (`visual.patch_embed.proj.weight`, `visual.blocks.N...`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.mlp import SwiGLU
from ..layers.norm import RMSNorm
from ..ops.rope import check_grid, rope_inv_freq, rotate_half
from .config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        p, tp = config.patch_size, config.temporal_patch_size
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=(tp, p, p), stride=(tp, p, p), bias=False)
        self.patch_dim = config.in_channels * tp * p * p

    def forward(self, x_NP: torch.Tensor) -> torch.Tensor:
        # A stride-equals-kernel Conv3d over one patch is a matmul with the flattened kernel.
        w = self.proj.weight
        return F.linear(x_NP.to(w.dtype), w.reshape(w.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.backend = "torch"  # set by InfiniteVL.set_backend(vision=True)

    def forward(self, x_GSE, cos_SF, sin_SF, mask_GSS=None):
        """Attention inside each of the G groups of S patches (under `mask_GSS` when given);
        cos/sin broadcast against [..., S, F]."""
        *lead, S, E = x_GSE.shape
        if self.backend == "fla" and not torch.is_grad_enabled():
            # one kernel splits, rotates and lays out q/k/v as 4-D [groups, heads, S, F] views: SDPA's fused kernels
            # instead of the math fallback a 5-D input gets, no float32 copies, and an output in tokens-first memory
            from ..ops.vision_rope import qkv_rope_for_sdpa

            q, k, v = qkv_rope_for_sdpa(self.qkv(x_GSE), cos_SF, sin_SF, self.num_heads)
            mask = None
            if mask_GSS is not None:  # one [S, S] pattern for every group, or one per group (broadcast to all)
                one = mask_GSS.numel() == S * S
                mask = mask_GSS.reshape(1, S, S) if one else mask_GSS.expand(*lead, S, S).reshape(-1, S, S)
                mask = mask[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.proj(o.transpose(1, 2).reshape(*lead, S, E))
        qkv = self.qkv(x_GSE).view(*lead, S, 3, self.num_heads, -1)
        v = qkv[..., 2, :, :]
        # q and k rotated together (one pass over both)
        cos, sin = cos_SF[..., None, None, :].float(), sin_SF[..., None, None, :].float()
        qk = qkv[..., :2, :, :].float()
        q, k = (qk * cos + rotate_half(qk) * sin).to(v.dtype).unbind(-3)
        mask = None if mask_GSS is None else mask_GSS[..., None, :, :]
        o = F.scaled_dot_product_attention(q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3), attn_mask=mask)
        return self.proj(o.transpose(-2, -3).reshape(*lead, S, E))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=True)

    def forward(self, x, cos, sin, mask=None, segments: "Segments | None" = None, pending=None,
                unadded: bool = False):
        """x [..., S, E]; with `segments`, x is [N, E] and attention stays inside each segment. The input is
        x + pending when pending is given; with unadded=True the output is (residual, update), their sum left to
        the next norm (one kernel with it on the fast backend), as in the LLM decoder."""
        if pending is None:
            h = self.norm1(x)
        else:
            x, h = self.norm1.add_and_norm(x, pending)
        a = self.attn(h, cos, sin, mask) if segments is None else segments.attend(self.attn, h, cos, sin)
        x, h = self.norm2.add_and_norm(x, a)
        if unadded:
            return x, self.mlp(h)
        return x + self.mlp(h)


@dataclass
class Segments:
    """Contiguous runs of patches that attend only among themselves (frames, or windows), batched by length:
    the runs of each length are gathered into one [G, S, E] batch. No [N, N] mask, and only the attention
    inside each run is computed, whatever the number of images in a forward. Built on the host from the
    layout, so attending never syncs."""

    lengths: list[int]  # one per batch of equal-length runs
    index: list[torch.Tensor | None]  # the patches of each batch (None: all N in order, a plain reshape)
    restore: torch.Tensor | None  # concatenated batch outputs -> patch order (None when already in order)

    @staticmethod
    def of(ids_N: torch.Tensor, device) -> "Segments":
        """ids_N (host): each patch's run id, equal ids contiguous."""
        counts = torch.unique_consecutive(ids_N, return_counts=True)[1].tolist()
        starts, by_len = 0, {}
        for n in counts:
            by_len.setdefault(n, []).append(starts)
            starts += n
        if len(by_len) == 1:
            return Segments(list(by_len), [None], None)
        lengths, index = [], []
        for n, firsts in by_len.items():
            lengths.append(n)
            index.append((torch.tensor(firsts)[:, None] + torch.arange(n)).flatten())
        restore = torch.argsort(torch.cat(index))
        return Segments(lengths, [i.to(device) for i in index], restore.to(device))

    def attend(self, attn: "VisionAttention", h_NE, cos_NF, sin_NF):
        E, F = h_NE.shape[-1], cos_NF.shape[-1]
        outs = []
        for n, idx in zip(self.lengths, self.index):
            h, cos, sin = (h_NE, cos_NF, sin_NF) if idx is None else (h_NE[idx], cos_NF[idx], sin_NF[idx])
            outs.append(attn(h.view(-1, n, E), cos.view(-1, n, F), sin.view(-1, n, F)).reshape(-1, E))
        if self.restore is None:
            return outs[0]
        return torch.cat(outs)[self.restore]


class PatchMerger(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.group = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = RMSNorm(config.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.group, self.group), nn.GELU(), nn.Linear(self.group, config.out_hidden_size)
        )

    def forward(self, x_NE: torch.Tensor, pending_NE: torch.Tensor | None = None) -> torch.Tensor:
        """Merged tokens of x (+ pending: the last block's unadded update)."""
        h = self.ln_q(x_NE) if pending_NE is None else self.ln_q.add_and_norm(x_NE, pending_NE)[1]
        return self.mlp(h.view(-1, self.group))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def check_inputs(self, pixels_NP: torch.Tensor, grid_thw, name: str = "grid_thw") -> torch.Tensor:
        """The grids as a [num_images, 3] CPU long tensor, after checking them against the pixels (a ValueError
        names the mismatch). The features are then grid_t * grid_h * grid_w / merge**2 per image or video."""
        grid_thw = check_grid(grid_thw, name)
        n_expected = int(grid_thw.prod(-1).sum())
        if pixels_NP.ndim != 2 or pixels_NP.shape != (n_expected, self.patch_embed.patch_dim):
            raise ValueError(
                f"pixel values have shape {tuple(pixels_NP.shape)} but the grids {grid_thw.tolist()} need "
                f"[{n_expected}, {self.patch_embed.patch_dim}]: pass the processor's pixel_values with its grid_thw"
            )
        m = self.config.spatial_merge_size
        if ((grid_thw[:, 1:] % m) != 0).any():
            raise ValueError(f"grid h and w must be multiples of spatial_merge_size {m}, got {grid_thw.tolist()}")
        return grid_thw

    def forward(self, pixels_NP: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Returns the merged features [M, D], images/videos in input order. Frames are independent (attention
        stays within a frame, positions are per frame): the features of a video are those of its temporal
        patches run one by one."""
        cfg = self.config
        grid_thw = self.check_inputs(pixels_NP, grid_thw)
        m = cfg.spatial_merge_size
        device = pixels_NP.device
        x = self.patch_embed(pixels_NP)
        pos_N2, frame_N, window_N, order = _layout(grid_thw, m, cfg.window_size // m // cfg.patch_size)
        pos_N2 = pos_N2.to(device)
        inv_freq = rope_inv_freq(cfg.head_dim // 2, 10000.0, device=device)
        freqs = (pos_N2[..., None].float() * inv_freq).flatten(1)  # [N, F/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        # Reorder the merge groups window by window: frames and windows are then contiguous runs of patches.
        idx_host = (order[:, None] * m * m + torch.arange(m * m)).flatten()
        idx = idx_host.to(device)
        x, cos, sin = x[idx], cos[idx], sin[idx]
        segments = {True: Segments.of(frame_N[idx_host], device), False: Segments.of(window_N[idx_host], device)}
        pending = None  # each block's last residual add is done by the next norm (VisionBlock.forward)
        for i, block in enumerate(self.blocks):
            x, pending = block(x, cos, sin, segments=segments[i in cfg.fullatt_block_indexes], pending=pending,
                               unadded=True)
        merged = self.merger(x, pending)
        return merged[torch.argsort(order.to(device))]

    def frame_layout(self, height_patches: int, width_patches: int, device) -> "FrameLayout":
        """Everything `forward_frames` needs for frames of one size, computed once (on the host, then moved)."""
        cfg = self.config
        m = cfg.spatial_merge_size
        if height_patches % m or width_patches % m:
            raise ValueError(f"frame grids must be multiples of spatial_merge_size {m}, got {height_patches}x{width_patches}")
        pos_N2, _, window_N, order = _layout(torch.tensor([[1, height_patches, width_patches]]), m,
                                             cfg.window_size // m // cfg.patch_size)
        inv_freq = rope_inv_freq(cfg.head_dim // 2, 10000.0)
        freqs = (pos_N2[..., None].float() * inv_freq).flatten(1)
        emb = torch.cat([freqs, freqs], dim=-1)
        idx = (order[:, None] * m * m + torch.arange(m * m)).flatten()
        window_N = window_N[idx]
        sizes = torch.bincount(window_N)
        uniform = bool((sizes == sizes[0]).all())
        return FrameLayout(
            patch_order=idx.to(device), token_restore=torch.argsort(order).to(device),
            cos=emb.cos()[idx].to(device), sin=emb.sin()[idx].to(device),
            windows=len(sizes) if uniform else 0,
            window_mask=None if uniform else (window_N[:, None] == window_N[None, :]).to(device),
        )

    def forward_frames(self, pixels_P: torch.Tensor, layout: "FrameLayout") -> torch.Tensor:
        """B frames of one size (pixels [B * n, P] in processor order) -> merged features [B * M, D].
        Each frame is one image of the batch: attention never crosses frames, windows are a batch
        dimension when they tile the frame evenly, and nothing here syncs with the host (capturable)."""
        n = layout.patch_order.shape[0]
        x = self.patch_embed(pixels_P)
        E = x.shape[-1]
        x = x.view(-1, n, E)[:, layout.patch_order]  # window by window
        B = x.shape[0]
        nw = layout.windows
        cos_w, sin_w = (t.view(nw, n // nw, -1) for t in (layout.cos, layout.sin)) if nw else (None, None)
        p = None  # the last block's update, added by the next norm
        for i, block in enumerate(self.blocks):
            if i in self.config.fullatt_block_indexes:
                x, p = block(x, layout.cos, layout.sin, pending=p, unadded=True)
            elif nw:
                windows = (B, nw, n // nw, E)
                x, p = block(x.view(windows), cos_w, sin_w, pending=None if p is None else p.view(windows),
                             unadded=True)
                x, p = x.view(B, n, E), p.view(B, n, E)
            else:
                x, p = block(x, layout.cos, layout.sin, layout.window_mask, pending=p, unadded=True)
        merged = self.merger(x.reshape(B * n, E), None if p is None else p.reshape(B * n, E))
        return merged.view(B, -1, merged.shape[-1])[:, layout.token_restore].reshape(-1, merged.shape[-1])


@dataclass
class FrameLayout:
    """Per frame size: patch gather order (window by window), inverse order of the merged tokens, rotary
    cos/sin in window order, and how windows group (`windows` equal ones, or a mask when they differ)."""

    patch_order: torch.Tensor  # [n]
    token_restore: torch.Tensor  # [M]
    cos: torch.Tensor  # [n, F]
    sin: torch.Tensor  # [n, F]
    windows: int  # 0 when the windows are not all the same size
    window_mask: torch.Tensor | None  # [n, n] bool


def _layout(grid_thw: torch.Tensor, m: int, win: int):
    """Per patch (in processor order): its (h, w) position, its frame id and its window id; plus the
    order in which merge groups are visited window by window."""
    pos, frames, windows, order = [], [], [], []
    frame_id = window_id = group_base = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // m, w // m
        # (h, w) of each patch, in merge-group order: [gh, gw, m, m]
        hh = torch.arange(h).view(gh, m, 1, 1).expand(gh, m, gw, m).permute(0, 2, 1, 3).flatten()
        ww = torch.arange(w).view(1, 1, gw, m).expand(gh, m, gw, m).permute(0, 2, 1, 3).flatten()
        pos.append(torch.stack([hh, ww], -1).repeat(t, 1))
        frames.append(torch.arange(t).repeat_interleave(h * w) + frame_id)
        frame_id += t
        # Windows of win x win merge groups tile each frame (the last row/column may be partial).
        nwh, nww = -(-gh // win), -(-gw // win)
        gy = torch.arange(gh).view(gh, 1).expand(gh, gw)
        gx = torch.arange(gw).view(1, gw).expand(gh, gw)
        win_of_group = ((gy // win) * nww + gx // win).flatten()  # [gh*gw]
        for f in range(t):
            wid = win_of_group + window_id + f * nwh * nww
            windows.append(wid.repeat_interleave(m * m))
            group_ids = torch.arange(gh * gw) + group_base + f * gh * gw
            order.append(group_ids[torch.argsort(win_of_group, stable=True)])
        window_id += t * nwh * nww
        group_base += t * gh * gw
    return torch.cat(pos), torch.cat(frames), torch.cat(windows), torch.cat(order)
