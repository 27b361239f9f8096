"""The vision tower's attention input in one kernel (Triton, GPU): split the fused qkv projection, rotate q and k
(2D rotary, float32 like the reference) and lay q, k, v out tokens-first ([G, S, H, F] memory), handed to SDPA as
[G, H, S, F] views: the layout transformers' attention uses, for which SDPA's fused kernels write their output in
the same layout, so merging the heads back for the projection is a view, not a copy kernel per block.

Legend: G groups (images/frames, or windows), S tokens per group, H heads, F head dim, C rotary rows.

Reference (model/vision.py, VisionAttention on the torch backend):
    q, k = (qk.float() * cos + rotate_half(qk.float()) * sin).to(dtype);  v as is
Here each output element is computed the same way and rounded once, so results equal the reference's bits
(up to fused multiply-add contraction in float32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qkv_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, C, H: tl.constexpr, F: tl.constexpr,
                     HALF: tl.constexpr, BH: tl.constexpr, BF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # token (of all G * S, in order)
    which = tl.program_id(1)  # 0 q, 1 k, 2 v
    h = tl.arange(0, BH)[:, None]
    f = tl.arange(0, BF)[None, :]
    m = (h < H) & (f < F)
    src = qkv_ptr + row * (3 * H * F) + which * (H * F) + h * F + f
    x = tl.load(src, mask=m, other=0.0)
    dst = (row * H + h) * F + f  # tokens-first: [G, S, H, F]
    if which == 2:
        tl.store(v_ptr + dst, x, mask=m)
    else:
        # rotate_half: the first half takes -x[f + HALF], the second half x[f - HALF]
        partner = tl.where(f < HALF, f + HALF, f - HALF)
        xr = tl.load(qkv_ptr + row * (3 * H * F) + which * (H * F) + h * F + partner, mask=m, other=0.0)
        xr = tl.where(f < HALF, -xr.to(tl.float32), xr.to(tl.float32))
        c_row = row % C
        c = tl.load(cos_ptr + c_row * F + f, mask=f < F, other=0.0)
        sn = tl.load(sin_ptr + c_row * F + f, mask=f < F, other=0.0)
        y = (x.to(tl.float32) * c + xr * sn).to(x.dtype)
        if which == 0:
            tl.store(q_ptr + dst, y, mask=m)
        else:
            tl.store(k_ptr + dst, y, mask=m)


def qkv_rope_for_sdpa(qkv_GSX: torch.Tensor, cos_CF: torch.Tensor, sin_CF: torch.Tensor, heads: int):
    """qkv [..., S, 3 * H * F] (the fused projection's output, contiguous) and float32 cos/sin whose rows repeat
    every C tokens ([..., C, F]: one frame's or one window-set's table) -> q, k, v [G, H, S, F], q and k rotated
    (views of [G, S, H, F] memory)."""
    *lead, S, X = qkv_GSX.shape
    H = heads
    F = X // (3 * H)
    if X != 3 * H * F or F % 2:
        raise ValueError(f"qkv width {X} is not 3 x {H} heads x an even head dim")
    if cos_CF.shape[-2:] != (S, F) or sin_CF.shape != cos_CF.shape:
        raise ValueError(f"cos/sin must be [..., S={S}, F={F}] tables (one row per token of a group), got "
                         f"{tuple(cos_CF.shape)} and {tuple(sin_CF.shape)}")
    qkv = qkv_GSX.contiguous()
    cos, sin = cos_CF.reshape(-1, F).float().contiguous(), sin_CF.reshape(-1, F).float().contiguous()
    C = cos.shape[0]
    G = qkv.numel() // (S * X)
    if (G * S) % C:
        raise ValueError(f"{G * S} tokens are not a whole number of {C}-row rotary tables")
    q, k, v = (torch.empty(G, S, H, F, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    if G * S:
        _qkv_rope_kernel[(G * S, 3)](qkv, cos, sin, q, k, v, C, H=H, F=F, HALF=F // 2,
                                     BH=triton.next_power_of_2(H), BF=triton.next_power_of_2(F))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
