"""Fast sliding-window attention pieces (Triton, GPU); `swa.py` holds the reference.

Legend: B batch, T tokens, H query heads, G kv heads, D head dim, R ring slots, S splits of the ring.

Decode (one query token per row) never copies the ring buffer: a split-K kernel reads the ring in
place, each program covering one kv head's query heads over a slice of the slots (online softmax), and a
combine kernel folds in the current token's own key/value, which is not in the ring yet: with
R = window - 1 slots the new token's slot still holds the oldest key the query must see, so the ring
is written only after attention (`ring_write_step`). Same window rule as the reference: the query with
token index i sees keys j with i - window < j <= i, and empty slots (index -1) are skipped.
A stream's frame (a block of tokens with a state, bf16/fp16) reads the ring in place the same way
(`block_attention`: split-K over ring slots and the block's own keys, then a combine). Other prefill with a
state reads the ring concatenated with the new keys through PyTorch SDPA under the window mask (ops/swa.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, NH, stride_x, D: tl.constexpr, HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (b, t, head) row
    bt = row // NH
    d = tl.arange(0, D)
    # x may be a column slice of a fused projection: tokens `stride_x` apart, heads contiguous
    p_x = x_ptr + bt * stride_x + (row % NH) * D
    x = tl.load(p_x + d).to(tl.float32)
    rot_src = tl.where(d < HALF, d + HALF, d - HALF)
    xr = tl.load(p_x + rot_src).to(tl.float32)
    xr = tl.where(d < HALF, -xr, xr)  # rotate_half
    dt = y_ptr.dtype.element_ty
    c = tl.load(cos_ptr + bt * D + d).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + bt * D + d).to(dt).to(tl.float32)
    # round each product like the reference (x * cos + rotate_half(x) * sin in the activation dtype)
    y = (x * c).to(dt).to(tl.float32) + (xr * s).to(dt).to(tl.float32)
    tl.store(y_ptr + row * D + d, y.to(dt))


def apply_rope(x_BTHD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """Same as ops.rope.apply_rope, in one kernel."""
    B, T, NH, D = x_BTHD.shape
    assert D % 2 == 0 and D == triton.next_power_of_2(D), "head dim must be a power of two"
    x = x_BTHD.reshape(B * T, NH, D)
    if x.stride(-1) != 1 or x.stride(-2) != D:
        x = x.contiguous()
    cos, sin = cos_BTD.contiguous(), sin_BTD.contiguous()
    assert cos.shape == (B, T, D)
    y = torch.empty(B, T, NH, D, dtype=x_BTHD.dtype, device=x_BTHD.device)
    if y.numel():
        _rope_kernel[(B * T * NH,)](x, cos, sin, y, NH, x.stride(0), D=D, HALF=D // 2)
    return y


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, cur_ptr, m_ptr, l_ptr, acc_ptr,
                         R, G, H, window, scale, SPLIT,
                         REP: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                         NS: tl.constexpr, PRECISION: tl.constexpr):
    i_s, i_bg = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, g = i_bg // G, i_bg % G
    o_h = tl.arange(0, BH)
    m_h = o_h < REP
    d = tl.arange(0, D)
    # the REP query heads served by kv head g: heads g*REP .. g*REP+REP-1
    # float32 operands: with PRECISION 'tf32' (10 mantissa bits) bf16 inputs are still exact
    q = tl.load(q_ptr + (b * H + g * REP + o_h[:, None]) * D + d[None, :], mask=m_h[:, None], other=0.0)
    q = q.to(tl.float32)
    cur = tl.load(cur_ptr + b)
    m_i = tl.full([BH], -1e30, tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, D], tl.float32)
    start = i_s * SPLIT
    for j in range(0, SPLIT, BS):
        o_s = start + j + tl.arange(0, BS)
        in_ring = o_s < R
        idx = tl.load(idx_ptr + b * R + o_s, mask=in_ring, other=-1)
        ok = in_ring & (idx >= 0) & (idx <= cur) & (idx > cur - window)
        kv_off = ((b * R + o_s[:, None]) * G + g) * D + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    heads = g * REP + o_h
    part = (b * H + heads) * NS + i_s
    tl.store(m_ptr + part, m_i, mask=m_h)
    tl.store(l_ptr + part, l_i, mask=m_h)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=m_h[:, None])


@triton.jit
def _decode_combine_kernel(q_ptr, kn_ptr, vn_ptr, m_ptr, l_ptr, acc_ptr, o_ptr, G, H, scale,
                           REP: tl.constexpr, D: tl.constexpr, NS: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    g = h // REP
    d = tl.arange(0, D)
    sp = tl.arange(0, NS)
    q = tl.load(q_ptr + i_bh * D + d).to(tl.float32)
    kn = tl.load(kn_ptr + (b * G + g) * D + d).to(tl.float32)
    vn = tl.load(vn_ptr + (b * G + g) * D + d).to(tl.float32)
    s_new = tl.sum(q * kn, 0) * scale
    m = tl.load(m_ptr + i_bh * NS + sp)
    l = tl.load(l_ptr + i_bh * NS + sp)
    acc = tl.load(acc_ptr + (i_bh * NS + sp[:, None]) * D + d[None, :])
    M = tl.maximum(tl.max(m, 0), s_new)
    w = tl.exp(m - M)
    w_new = tl.exp(s_new - M)
    L = tl.sum(w * l, 0) + w_new
    o = (tl.sum(w[:, None] * acc, 0) + w_new * vn) / L
    tl.store(o_ptr + i_bh * D + d, o.to(o_ptr.dtype.element_ty))


def decode_attention(
    q_BHD: torch.Tensor,
    k_new_BGD: torch.Tensor,
    v_new_BGD: torch.Tensor,
    keys_BRGD: torch.Tensor,
    values_BRGD: torch.Tensor,
    token_index_BR: torch.Tensor,
    cur_idx_B: torch.Tensor,
    *,
    window: int,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per row over the ring (read in place) plus the token itself.
    Returns [B, H, D] in q's dtype."""
    B, H, D = q_BHD.shape
    R, G = keys_BRGD.shape[1], keys_BRGD.shape[2]
    REP = H // G
    assert H % G == 0 and D == triton.next_power_of_2(D) and D >= 16
    assert keys_BRGD.is_contiguous() and values_BRGD.is_contiguous() and token_index_BR.is_contiguous()
    BS = 64 if D <= 128 else 32
    if num_splits is None:
        # enough programs to fill the GPU at batch 1, each covering a whole number of blocks
        num_splits = max(1, min(64, triton.cdiv(R, BS), triton.cdiv(256, B * G)))
    NS = triton.next_power_of_2(num_splits)
    SPLIT = triton.cdiv(triton.cdiv(R, NS), BS) * BS
    q = q_BHD.contiguous()
    kn, vn = k_new_BGD.contiguous(), v_new_BGD.contiguous()
    m = torch.empty(B, H, NS, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, H, NS, D, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(NS, B * G)](
        q, keys_BRGD, values_BRGD, token_index_BR, cur_idx_B.contiguous(), m, l, acc, R, G, H, window, scale, SPLIT,
        REP=REP, BH=max(16, triton.next_power_of_2(REP)), D=D, BS=BS, NS=NS, PRECISION=precision,
    )
    o = torch.empty_like(q)
    _decode_combine_kernel[(B * H,)](q, kn, vn, m, l, acc, o, G, H, scale, REP=REP, D=D, NS=NS)
    return o


@triton.jit
def _ring_write_kernel(k_ptr, v_ptr, idx_ptr, kn_ptr, vn_ptr, cur_ptr, keep_ptr, R, G,
                       D: tl.constexpr, HAS_KEEP: tl.constexpr):
    i_bg = tl.program_id(0).to(tl.int64)
    b, g = i_bg // G, i_bg % G
    cur = tl.load(cur_ptr + b)
    keep = True
    if HAS_KEEP:
        keep = tl.load(keep_ptr + b) != 0
    if keep:
        slot = cur % R
        d = tl.arange(0, D)
        dst = ((b * R + slot) * G + g) * D + d
        tl.store(k_ptr + dst, tl.load(kn_ptr + i_bg * D + d).to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + dst, tl.load(vn_ptr + i_bg * D + d).to(v_ptr.dtype.element_ty))
        if g == 0:
            tl.store(idx_ptr + b * R + slot, cur)


def ring_write_step(state, k_new_BGD: torch.Tensor, v_new_BGD: torch.Tensor, cur_idx_B: torch.Tensor,
                    keep_B: torch.Tensor | None = None) -> None:
    """Write one token per row (token index `cur_idx_B`) into its ring slot, in place; rows with
    keep_B == 0 are left alone. Same effect as `swa.ring_write` for T == 1."""
    keys, values, idx = state.keys, state.values, state.token_index
    B, R, G, D = keys.shape
    assert keys.is_contiguous() and values.is_contiguous() and idx.is_contiguous()
    cur = cur_idx_B.contiguous()
    keep = None if keep_B is None else keep_B.contiguous()
    _ring_write_kernel[(B * G,)](
        keys, values, idx, k_new_BGD.contiguous(), v_new_BGD.contiguous(), cur, keep, R, G,
        D=D, HAS_KEEP=keep is not None,
    )



# ---------------------------------------------------------------- block prefill (a stream's frame)
# Blocks of 2..BLOCK_PREFILL_MAX_T tokens with a state, no padding and 16-bit activations take `block_attention`
# instead of SDPA over cat([ring, block]). H100, 4B shape, 448x448 frames: the LLM's frame step 12.22 -> 10.93 ms
# with the first, untuned version (benchmarks/results/README.md); 0 turns it off (env or attribute). Clips of
# several frames (push_clip) are longer blocks: on an H200 against the full ring, 1,024 tokens 0.43 ms (SDPA over the
# concatenation 0.69 ms), 2,048 tokens 0.85 ms (1.42 ms) (bench_block_attention.py --tokens ... --sdpa).
BLOCK_PREFILL_MAX_T = int(os.environ.get("INFINITEVL_SWA_BLOCK_PREFILL_MAX_T", "4096"))
_SPLIT_ALIGN = 128  # every slice of the key range is a whole number of key tiles, whatever tile autotuning picks
_LOG2E = 1.4426950408889634

# Tiles are tuned once per (query rows bucket, group size, head dim): T, R and the split count are runtime
# values, so a new prompt length re-times nothing inside a bucket (Triton may still compile a variant when an
# integer argument changes its divisibility by 16, and the combine kernel once per split count).
_BLOCK_CONFIGS = [triton.Config({"BM": bm, "BS": bs}, num_warps=w, num_stages=st)
                  for bm, bs, w, st in ((64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3),
                                        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3))]
assert all(_SPLIT_ALIGN % c.kwargs["BS"] == 0 for c in _BLOCK_CONFIGS)  # no key tile straddles two splits


@triton.jit
def _block_tile(q, k, v, kr, qr, qr_lo, qr_hi, m_i, l_i, acc, window, scale_log2):
    """One key/value tile into a program's online softmax (base 2). Token indices are int32, relative to the
    program's first query (kr = -2**30: an empty slot or past the end), so a key is in row i's window iff
    0 <= qr_i - kr < window: one unsigned compare. Only tiles holding a key outside some row's window (qr_lo..qr_hi)
    are masked: a uniform branch, with the dots outside it (H200, 4B shape, full 8K ring: one frame 0.105 -> 0.094
    ms, 8-frame clip 0.730 -> 0.688, 32 streams 2.50 -> 2.23; masking every tile with the cheap compare alone
    gained nothing). The scale folds into the exponent's multiply-add, as in flash attention."""
    s = tl.dot(q, tl.trans(k))
    if (tl.min(kr) <= qr_hi - window) | (tl.max(kr) > qr_lo):
        s = tl.where((qr[:, None] - kr[None, :]).to(tl.uint32, bitcast=True) < window, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * scale_log2 - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _block_keys(q, qr, m_i, l_i, acc, idx_ptr, k_ptr, v_ptr, base, lo, hi, g, G, d, window, scale_log2,
                qbase, qr_lo, qr_hi, D: tl.constexpr, BS: tl.constexpr):
    """The online-softmax step over keys [lo, hi) of one key buffer (rows base + j of [*, G, D] keys/values and
    their token indices): the ring (base b * R) or the block's own keys (base b * T)."""
    for j0 in range(lo, hi, BS):
        j = j0 + tl.arange(0, BS)
        j_ok = j < hi
        kidx = tl.load(idx_ptr + base + j, mask=j_ok, other=-1)
        off = ((base + j[:, None]) * G + g) * D + d[None, :]
        k = tl.load(k_ptr + off, mask=j_ok[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_ptr + off, mask=j_ok[:, None], other=0.0).to(q.dtype)
        kr = tl.where(kidx >= 0, tl.minimum(tl.maximum(kidx - qbase, -(1 << 30)), 1 << 30), -(1 << 30))
        m_i, l_i, acc = _block_tile(q, k, v, kr.to(tl.int32), qr, qr_lo, qr_hi, m_i, l_i, acc, window, scale_log2)
    return m_i, l_i, acc


@triton.autotune(configs=_BLOCK_CONFIGS, key=["TR_BUCKET", "REP", "D"])
@triton.jit
def _block_split_kernel(q_ptr, kn_ptr, vn_ptr, qidx_ptr, k_ptr, v_ptr, ridx_ptr, m_ptr, l_ptr, acc_ptr,
                        T, R, G, H, window, scale_log2, SPLIT, TR, NS, TR_BUCKET,
                        REP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr):
    """One program: BM query rows of kv head g (row r = token r // REP, head g * REP + r % REP) against the
    slice [i_s * SPLIT, (i_s + 1) * SPLIT) of the virtual key range: ring slots 0..R-1, then the block's own
    keys R..R+T-1, in two loops (one load per key/value tile). Writes the slice's online-softmax partials (max
    and sum in base 2, unnormalised output). 16-bit operands: tensor-core dots with float32 accumulation, as
    flash attention."""
    i_m, i_s, i_bg = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b, g = i_bg // G, i_bg % G
    r = i_m * BM + tl.arange(0, BM)
    r_ok = r < TR
    t = r // REP
    h = g * REP + r % REP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + ((b * T + t[:, None]) * H + h[:, None]) * D + d[None, :], mask=r_ok[:, None], other=0.0)
    # token indices relative to the program's first query, as int32 (keys clamped to +-2**30, window <= 2**30)
    qbase = tl.load(qidx_ptr + b * T + (i_m * BM) // REP)
    qr = (tl.load(qidx_ptr + b * T + t, mask=r_ok, other=0) - qbase).to(tl.int32)
    qr_lo = tl.min(tl.where(r_ok, qr, 1 << 30))
    qr_hi = tl.max(tl.where(r_ok, qr, -(1 << 30)))
    m_i = tl.full([BM], -1e30, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    lo = i_s * SPLIT
    hi = tl.minimum(lo + SPLIT, R + T)
    # ring slots [lo, min(hi, R)), then the block's own keys [max(lo, R), hi) - R (causal within the block:
    # none after this tile's last token, so a long block's early rows skip the tiles they would mask whole)
    m_i, l_i, acc = _block_keys(q, qr, m_i, l_i, acc, ridx_ptr, k_ptr, v_ptr, b * R, lo, tl.minimum(hi, R),
                                g, G, d, window, scale_log2, qbase, qr_lo, qr_hi, D=D, BS=BS)
    m_i, l_i, acc = _block_keys(q, qr, m_i, l_i, acc, qidx_ptr, kn_ptr, vn_ptr, b * T, tl.maximum(lo, R) - R,
                                tl.minimum(hi - R, (i_m * BM + BM - 1) // REP + 1), g, G, d, window, scale_log2,
                                qbase, qr_lo, qr_hi, D=D, BS=BS)
    part = (i_bg * NS + i_s) * TR + r
    tl.store(m_ptr + part, m_i, mask=r_ok)
    tl.store(l_ptr + part, l_i, mask=r_ok)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=r_ok[:, None])


@triton.jit
def _block_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, T, G, H, TR,
                          REP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, NS: tl.constexpr):
    i_m, i_bg = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, g = i_bg // G, i_bg % G
    r = i_m * BM + tl.arange(0, BM)
    r_ok = r < TR
    d = tl.arange(0, D)
    M = tl.full([BM], -1e30, tl.float32)
    for s in range(NS):
        M = tl.maximum(M, tl.load(m_ptr + (i_bg * NS + s) * TR + r, mask=r_ok, other=-1e30))
    L = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for s in range(NS):
        part = (i_bg * NS + s) * TR + r
        w = tl.exp2(tl.load(m_ptr + part, mask=r_ok, other=-1e30) - M)
        L += w * tl.load(l_ptr + part, mask=r_ok, other=0.0)
        acc += w[:, None] * tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=r_ok[:, None], other=0.0)
    o = acc / L[:, None]
    t, h = r // REP, g * REP + r % REP
    tl.store(o_ptr + ((b * T + t[:, None]) * H + h[:, None]) * D + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=r_ok[:, None])


def block_attention_supports(head_dim: int, dtype: torch.dtype) -> bool:
    """What `block_attention` runs: a power-of-two head dim in 16..128 (its tiles fit shared memory up to 128)
    and bf16/fp16 activations (float32 stays on SDPA)."""
    return 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0 and dtype in (torch.bfloat16, torch.float16)


def block_attention(
    q_BTHD: torch.Tensor,
    k_new_BTGD: torch.Tensor,
    v_new_BTGD: torch.Tensor,
    tok_idx_BT: torch.Tensor,
    keys_BRGD: torch.Tensor,
    values_BRGD: torch.Tensor,
    token_index_BR: torch.Tensor,
    *,
    window: int,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of a block of T query tokens per row (no padding) over the ring, read in place, plus the
    block's own keys (causal): what `sliding_window_attention` computes over `cat([ring, block])` under
    `window_mask`, without the concatenation, the [B, T, R + T] mask or a kv repeat. The query heads of each
    kv head fold into the query rows; the key range is split over programs when B * G alone cannot fill the
    GPU, then combined. bf16/fp16 only (float32 stays on SDPA). Returns [B, T, H, D] in q's dtype. The ring
    is written afterwards by the caller. Each row's block tokens have rising token indices (a block is
    < 2**30 tokens; a window above 2**30 acts as 2**30)."""
    B, T, H, D = q_BTHD.shape
    R, G = keys_BRGD.shape[1], keys_BRGD.shape[2]
    if H % G or not block_attention_supports(D, q_BTHD.dtype):
        raise ValueError(f"block_attention needs H % G == 0, a power-of-two head dim in 16..128 and bf16/fp16 "
                         f"activations (H={H}, G={G}, D={D}, {q_BTHD.dtype}): use SDPA "
                         f"(ops.swa.sliding_window_attention) otherwise")
    REP = H // G
    TR = T * REP
    q = q_BTHD.contiguous()
    kn, vn = k_new_BTGD.contiguous(), v_new_BTGD.contiguous()
    keys, values, ridx = keys_BRGD.contiguous(), values_BRGD.contiguous(), token_index_BR.contiguous()
    qidx = tok_idx_BT.to(ridx.dtype).contiguous()
    if num_splits is None:  # about four waves of programs on an H100 (counted with 64-row tiles): at one 256-token
        # frame of the 4B shape 9 splits (0.19 ms a layer against 0.22 ms with 5; bench_block_attention.py)
        num_splits = max(1, min(32, triton.cdiv(R + T, 4 * _SPLIT_ALIGN),
                                triton.cdiv(528, triton.cdiv(TR, 64) * B * G)))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    NS = num_splits
    SPLIT = triton.cdiv(triton.cdiv(R + T, NS), _SPLIT_ALIGN) * _SPLIT_ALIGN
    m = torch.empty(B * G, NS, TR, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B * G, NS, TR, D, dtype=torch.float32, device=q.device)
    args = (q, kn, vn, qidx, keys, values, ridx, m, l, acc, T, R, G, H, min(window, 1 << 30), scale * _LOG2E,
            SPLIT, TR, NS, min(triton.next_power_of_2(TR), 4096))
    grid = lambda meta: (triton.cdiv(TR, meta["BM"]), NS, B * G)  # noqa: E731
    _block_split_kernel[grid](*args, REP=REP, D=D)
    o = torch.empty_like(q)
    _block_combine_kernel[(triton.cdiv(TR, 64), B * G)](m, l, acc, o, T, G, H, TR, REP=REP, D=D, BM=64, NS=NS)
    return o
