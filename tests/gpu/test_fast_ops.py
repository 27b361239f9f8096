"""Every fast op against its plain-PyTorch reference, on the GPU.

fla's chunk kernel computes float32 matmuls in TF32 (unless TRITON_F32_DEFAULT=ieee): those comparisons
use relative-error bounds that say so. Kernels without matmuls are held to float32 rounding.
"""
import pytest
import torch
import torch.nn.functional as F

from infinitevl.layers.norm import GatedRMSNorm, RMSNorm
from infinitevl.ops import gated_delta, short_conv, swa
from infinitevl.ops.rope import apply_rope

from .conftest import rel

DEV = "cuda"



def gdn_inputs(B, T, H=4, K=128, V=256, dtype=torch.float32):
    q = torch.randn(B, T, H, K, device=DEV, dtype=dtype)
    k = torch.randn(B, T, H, K, device=DEV, dtype=dtype)
    v = torch.randn(B, T, H, V, device=DEV, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=DEV)) * 0.3
    beta = torch.rand(B, T, H, device=DEV)
    return q, k, v, g, beta


@pytest.mark.parametrize("T", [17, 64, 300])
@pytest.mark.parametrize("with_state", [False, True])
def test_fla_chunk_matches_reference(T, with_state):
    from infinitevl.ops.gated_delta import fla

    q, k, v, g, beta = gdn_inputs(2, T)
    s0 = torch.randn(2, 4, 128, 256, device=DEV) * 0.1 if with_state else None
    o, s = fla.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o_r, s_r = gated_delta.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert s.dtype == torch.float32
    assert rel(o, o_r) < 5e-3 and rel(s, s_r) < 5e-3, (rel(o, o_r), rel(s, s_r))


@pytest.mark.parametrize("T", [1, 5])
def test_fla_recurrent_matches_reference(T):
    from infinitevl.ops.gated_delta import fla

    q, k, v, g, beta = gdn_inputs(3, T)
    s0 = torch.randn(3, 4, 128, 256, device=DEV) * 0.1
    o, s = fla.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o_r, s_r = gated_delta.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o, o_r, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s, s_r, atol=1e-5, rtol=1e-4)


def test_fla_varlen_equals_padded_batch_and_reference():
    lens = [70, 5, 129]
    q, k, v, g, beta = gdn_inputs(1, sum(lens))
    cu = torch.tensor([0, 70, 75, 204], device=DEV)
    s0 = torch.randn(3, 4, 128, 256, device=DEV) * 0.1
    o, s = gated_delta.gated_delta_rule(q, k, v, g, beta, backend="fla", initial_state=s0, output_final_state=True,
                                        cu_seqlens=cu)
    o_r, s_r = gated_delta.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                                  cu_seqlens=cu)
    assert rel(o, o_r) < 5e-3 and rel(s, s_r) < 5e-3
    # the same sequences as a right-padded batch: padding masked with g = beta = 0 is inert
    Tm = max(lens)
    pad = lambda x: torch.stack([F.pad(x[0, a:b], (0, 0) * (x.dim() - 2) + (0, Tm - (b - a))) for a, b in
                                 zip(cu[:-1].tolist(), cu[1:].tolist())])
    mask = torch.stack([torch.arange(Tm, device=DEV) < n for n in lens]).long()
    gp, bp = gated_delta.mask_padding(pad(g), pad(beta), mask)
    o_p, s_p = gated_delta.gated_delta_rule(pad(q), pad(k), pad(v), gp, bp, backend="fla", initial_state=s0,
                                            output_final_state=True)
    assert rel(s_p, s) < 1e-3
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        assert rel(o_p[i, : b - a], o[0, a:b]) < 1e-3


def test_fla_bf16_inputs_keep_float32_state():
    q, k, v, g, beta = gdn_inputs(2, 200, dtype=torch.bfloat16)
    s0 = torch.randn(2, 4, 128, 256, device=DEV) * 0.1
    o, s = gated_delta.gated_delta_rule(q, k, v, g, beta, backend="fla", initial_state=s0, output_final_state=True)
    o_r, s_r = gated_delta.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel(o, o_r) < 2e-2 and rel(s, s_r) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 3, 100])
def test_short_conv_fast_matches_reference(dtype, T):
    from infinitevl.ops import short_conv_fast

    B, C, W = 2, 512, 4
    x = torch.randn(B, T, C, device=DEV, dtype=dtype)
    w = torch.randn(C, W, device=DEV, dtype=dtype) * 0.5
    st = torch.randn(B, C, W - 1, device=DEV, dtype=dtype)
    y_r, s_r = short_conv.short_conv(x, w, state_BCW=st)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    y, s = short_conv_fast.short_conv(x, w, state_BCW=st)
    torch.testing.assert_close(y, y_r, **tol)
    torch.testing.assert_close(s, s_r, atol=0, rtol=0)
    if T == 1:
        st2 = st.clone()
        y1 = short_conv_fast.short_conv_step(x, w, st2)
        torch.testing.assert_close(y1, y_r, **tol)
        torch.testing.assert_close(st2, s_r, atol=0, rtol=0)
        keep = torch.tensor([0, 1], device=DEV)
        st3 = st.clone()
        short_conv_fast.short_conv_step(x, w, st3, keep_B=keep)
        assert torch.equal(st3[0], st[0]) and torch.equal(st3[1], s_r[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,W", [(2, 1, 4), (1, 2, 4), (2, 3, 4), (3, 256, 4), (1, 70, 3), (2, 5, 2)])
def test_short_conv_chunk3_continues_and_advances_states_in_place(dtype, B, T, W):
    from infinitevl.ops import short_conv_fast

    Cs = (2048, 64, 130)
    fused = torch.randn(B, T, sum(Cs) + 40, device=DEV, dtype=dtype)  # strided slices, as the fused projection's
    xs = list(torch.split(fused, [*Cs, 40], dim=-1)[:3])
    ws = [torch.randn(C, W, device=DEV, dtype=dtype) * 0.5 for C in Cs]
    states = [torch.randn(B, C, W - 1, device=DEV, dtype=dtype) for C in Cs]
    refs = [short_conv.short_conv(x, w, state_BCW=s) for x, w, s in zip(xs, ws, states)]
    ys = short_conv_fast.short_conv_chunk3(xs, ws, states)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for (y_r, s_r), y, s in zip(refs, ys, states):
        torch.testing.assert_close(y, y_r, **tol)
        assert torch.equal(s, s_r)  # the state is the last W-1 inputs: copied, never rounded


def test_short_conv_packed_matches_reference():
    from infinitevl.ops import short_conv_fast

    x = torch.randn(1, 50, 256, device=DEV)
    w = torch.randn(256, 4, device=DEV)
    cu = torch.tensor([0, 3, 4, 50], device=DEV)
    torch.testing.assert_close(short_conv_fast.short_conv_packed(x, w, cu), short_conv.short_conv_packed(x, w, cu),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_small_ops_match_layers(dtype):
    from infinitevl.ops import fused, swa_fast

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}  # bf16: torch's default (1 ulp)
    x = torch.randn(3, 5, 2048, device=DEV, dtype=dtype)
    n = RMSNorm(2048, 1e-6).to(DEV, dtype)
    torch.nn.init.normal_(n.weight)
    torch.testing.assert_close(fused.rms_norm(x, n.weight, 1e-6), n(x), **tol)
    x, gate = torch.randn(2, 3, 16, 256, device=DEV, dtype=dtype), torch.randn(2, 3, 16, 256, device=DEV, dtype=dtype)
    gn = GatedRMSNorm(256, 1e-5).to(DEV, dtype)
    torch.nn.init.normal_(gn.weight)
    torch.testing.assert_close(fused.gated_rms_norm(x, gate, gn.weight, 1e-5), gn(x, gate), **tol)
    a, b = torch.randn(2, 7, 16, device=DEV, dtype=dtype) * 8, torch.randn(2, 7, 16, device=DEV, dtype=dtype)
    A_log, dt_bias = torch.rand(16, device=DEV, dtype=dtype) + 0.5, torch.randn(16, device=DEV, dtype=dtype)
    mask = (torch.rand(2, 7, device=DEV) > 0.3).long()
    g, beta = fused.gdn_gates(a, b, A_log, dt_bias, mask_BT=mask)
    g_r = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    g_r, b_r = gated_delta.mask_padding(g_r, b.float().sigmoid(), mask)
    torch.testing.assert_close(g, g_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(beta, b_r, atol=1e-6, rtol=1e-6)
    u, v = torch.randn(4, 11008, device=DEV, dtype=dtype), torch.randn(4, 11008, device=DEV, dtype=dtype)
    torch.testing.assert_close(fused.silu_mul(u, v), F.silu(u) * v, **tol)
    torch.testing.assert_close(fused.silu_mul_fused(torch.cat([u, v], -1)), F.silu(u) * v, **tol)
    q = torch.randn(2, 3, 16, 128, device=DEV, dtype=dtype)
    cos, sin = torch.randn(2, 3, 128, device=DEV), torch.randn(2, 3, 128, device=DEV)
    # bf16: measured within one rounding of the larger product where the two products cancel
    rope_tol = tol if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(swa_fast.apply_rope(q, cos, sin), apply_rope(q, cos, sin), **rope_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,R,cur", [(1, 8191, [20000]), (3, 31, [5, 31, 100])])
def test_decode_attention_reads_ring_in_place(dtype, B, R, cur):
    from types import SimpleNamespace

    from infinitevl.ops import swa_fast

    G, H, D, window = 2, 16, 128, R + 1
    keys = torch.randn(B, R, G, D, device=DEV, dtype=dtype)
    values = torch.randn(B, R, G, D, device=DEV, dtype=dtype)
    idx = torch.full((B, R), -1, dtype=torch.long, device=DEV)
    for b, c in enumerate(cur):
        t = torch.arange(max(0, c - R), c, device=DEV)
        idx[b, t % R] = t
    cur_t = torch.tensor(cur, device=DEV)
    q = torch.randn(B, H, D, device=DEV, dtype=dtype)
    kn, vn = torch.randn(B, G, D, device=DEV, dtype=dtype), torch.randn(B, G, D, device=DEV, dtype=dtype)
    o = swa_fast.decode_attention(q, kn, vn, keys, values, idx, cur_t, window=window, scale=D**-0.5)
    K, V = torch.cat([keys, kn[:, None]], 1), torch.cat([values, vn[:, None]], 1)
    KI = torch.cat([idx, cur_t[:, None]], 1)
    mask = swa.window_mask(cur_t[:, None], KI, window, k_valid_BS=KI >= 0)
    o_r = swa.sliding_window_attention(q[:, None], K, V, mask, scale=D**-0.5)[:, 0]
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(o, o_r, **tol)
    ours = SimpleNamespace(keys=keys.clone(), values=values.clone(), token_index=idx.clone())
    ref = SimpleNamespace(keys=keys.clone(), values=values.clone(), token_index=idx.clone())
    swa_fast.ring_write_step(ours, kn, vn, cur_t)
    swa.ring_write(ref, kn[:, None], vn[:, None], cur_t[:, None], torch.ones(B, 1, dtype=torch.bool, device=DEV))
    assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)
    assert torch.equal(ours.token_index, ref.token_index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_step3_add_norm_and_gemv(dtype):
    from infinitevl.ops import fused, short_conv_fast
    from infinitevl.ops.gemv import gemv

    B, W, Cs = 3, 4, [2048, 2048, 4096]
    full = torch.randn(B, 1, 9000, device=DEV, dtype=dtype)
    xs = [full[..., :2048], full[..., 2048:4096], full[..., 4096:8192]]
    ws = [torch.randn(C, W, device=DEV, dtype=dtype) for C in Cs]
    sts = [torch.randn(B, C, W - 1, device=DEV, dtype=dtype) for C in Cs]
    refs = [short_conv.short_conv(x, w, state_BCW=s) for x, w, s in zip(xs, ws, sts)]
    new = [s.clone() for s in sts]
    keep = torch.tensor([1, 0, 1], device=DEV)
    ys = short_conv_fast.short_conv_step3(xs, ws, new, keep_B=keep)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for y, (y_r, s_r), s_new, s_old in zip(ys, refs, new, sts):
        torch.testing.assert_close(y, y_r, **tol)
        assert torch.equal(s_new[[0, 2]], s_r[[0, 2]]) and torch.equal(s_new[1], s_old[1])
    x, h = torch.randn(5, 2048, device=DEV, dtype=dtype), torch.randn(5, 2048, device=DEV, dtype=dtype)
    n = RMSNorm(2048, 1e-6).to(DEV, dtype)
    torch.nn.init.normal_(n.weight)
    s, y = fused.add_rms_norm(x, h, n.weight, 1e-6)
    assert torch.equal(s, x + h)
    torch.testing.assert_close(y, n(x + h), **({} if dtype == torch.bfloat16 else tol))
    for N, K in [(12320, 2048), (2048, 4096), (1000, 300)]:
        w, b = torch.randn(N, K, device=DEV, dtype=dtype) * 0.05, torch.randn(N, device=DEV, dtype=dtype)
        xv = torch.randn(1, 1, K, device=DEV, dtype=dtype)
        ref = F.linear(xv.double(), w.double(), b.double())
        assert rel(gemv(xv, w, b), ref) < (1e-5 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("F_", [80, 16])
def test_vision_qkv_rope_matches_reference(dtype, F_):
    """The vision attention's split + 2D rotary + layout kernel against VisionAttention's torch code: windows of S
    tokens, the rotary table repeating every G2 * S tokens (one frame's windows); [G, H, S, F] views of
    tokens-first memory, so SDPA's output merges its heads without a copy."""
    from infinitevl.ops.rope import rotate_half
    from infinitevl.ops.vision_rope import qkv_rope_for_sdpa

    G1, G2, S, H = 3, 4, 16, 5
    qkv = torch.randn(G1, G2, S, 3 * H * F_, device=DEV, dtype=dtype)
    ang = torch.randn(G2, S, F_ // 2, device=DEV)
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos(), emb.sin()
    q, k, v = qkv_rope_for_sdpa(qkv, cos, sin, H)
    assert all(t.transpose(1, 2).is_contiguous() for t in (q, k, v))
    x = qkv.view(G1, G2, S, 3, H, F_)
    qk = x[..., :2, :, :].float()
    c, s = cos[:, :, None, None, :], sin[:, :, None, None, :]
    rq, rk = (qk * c + rotate_half(qk) * s).to(dtype).unbind(-3)
    heads_first = lambda t: t.reshape(G1 * G2, S, H, F_).transpose(1, 2)  # noqa: E731
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(q, heads_first(rq), **tol)
    torch.testing.assert_close(k, heads_first(rk), **tol)
    assert torch.equal(v, heads_first(x[..., 2, :, :]))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("grid_hw", [(8, 8), (6, 8)])  # windows that tile the frame, and partial ones (a mask)
def test_fast_vision_tower_matches_reference(batch, grid_hw):
    """forward_frames (windowed attention as 4-D SDPA, the rotary kernel, fused MLP padded from a misaligned
    hidden size like the real 3420) and the general forward against the torch backend, float32."""
    from infinitevl import InfiniteVL, preset

    torch.manual_seed(0)
    cfg_all = preset("tiny")
    cfg_all.vision.intermediate_size = 42
    model = InfiniteVL(cfg_all).to(DEV).eval()
    vis = model.visual
    cfg = vis.config
    gh, gw = grid_hw
    P = 3 * cfg.temporal_patch_size * cfg.patch_size**2
    pixels = torch.randn(batch * gh * gw, P, device=DEV)
    layout = vis.frame_layout(gh, gw, DEV)
    grid = torch.tensor([[1, gh, gw]] * batch)
    with torch.no_grad():
        model.set_backend("torch")
        want_frames, want = vis.forward_frames(pixels, layout), vis(pixels, grid)
        model.set_backend("auto", vision=True)
        model.fuse_projections(vision=True)
        got_frames, got = vis.forward_frames(pixels, layout), vis(pixels, grid)
    assert vis.blocks[0].mlp.down_padded
    assert rel(got_frames, want_frames) < 1e-4 and rel(got, want) < 1e-4
    torch.testing.assert_close(got_frames, want, rtol=1e-3, atol=1e-3)


def _ring(B, R, seen):
    """Token index per ring slot after `seen[b]` tokens (slot = index mod R; -1 = never written)."""
    idx = torch.full((B, R), -1, dtype=torch.long)
    for b, n in enumerate(seen):
        for i in range(max(0, n - R), n):
            idx[b, i % R] = i
    return idx.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,R,window,seen,splits", [
    (2, 5, 11, 12, [30, 3], None),  # a wrapped ring and a part-empty one
    (1, 7, 9, 10, [0], 3),  # the first block of a stream: ring empty
    (2, 70, 40, 41, [100, 17], None),  # a block longer than the ring
    (1, 256, 127, 128, [1000], None),  # a frame against a full ring (the 4B stream's shape, scaled down)
    (1, 70, 200, 201, [1000], 4),  # several non-empty splits, one straddling the ring's end (R % 64 != 0)
    (1, 9, 30, 31, [5], 12),  # more splits than key tiles: empty slices
    (1, 1000, 255, 256, [3000], 3),  # a clip of frames, longer than the window: causal tile skipping, splits
    (2, 300, 127, 128, [500, 40], None),
])
def test_block_attention_reads_ring_in_place(dtype, B, T, R, window, seen, splits):
    H, G, D = 8, 2, 128
    q = torch.randn(B, T, H, D, device=DEV, dtype=dtype)
    kn, vn = (torch.randn(B, T, G, D, device=DEV, dtype=dtype) for _ in range(2))
    keys, values = (torch.randn(B, R, G, D, device=DEV, dtype=dtype) for _ in range(2))
    ridx = _ring(B, R, seen)
    tok = torch.stack([torch.arange(s, s + T) for s in seen]).to(DEV)
    from infinitevl.ops import swa_fast

    o = swa_fast.block_attention(q, kn, vn, tok, keys, values, ridx, window=window, scale=D**-0.5, num_splits=splits)
    kidx = torch.cat([ridx, tok], 1)
    mask = swa.window_mask(tok, kidx, window, k_valid_BS=kidx >= 0)
    want = swa.sliding_window_attention(q.float(), torch.cat([keys, kn], 1).float(), torch.cat([values, vn], 1).float(),
                                        mask, scale=D**-0.5)
    assert o.dtype == dtype and o.shape == q.shape
    assert rel(o, want) < (2e-3 if dtype == torch.float16 else 1e-2)
    if (B, T) == (2, 5):
        with pytest.raises(ValueError, match="bf16/fp16"):
            swa_fast.block_attention(q.float(), kn.float(), vn.float(), tok, keys.float(), values.float(), ridx,
                                     window=window, scale=D**-0.5)
