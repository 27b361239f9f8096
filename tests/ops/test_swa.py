import torch

from infinitevl.model.state import SWAState
from infinitevl.ops.swa import ring_write, ring_write_last, sliding_window_attention, window_mask


def _naive(q, k, v, window):
    """Loop over queries: query i attends keys j with i - window < j <= i; kv head g serves query heads
    g*rep .. g*rep+rep-1."""
    B, T, H, D = q.shape
    G = k.shape[2]
    rep = H // G
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                lo = max(0, i - window + 1)
                s = (k[b, lo : i + 1, h // rep] @ q[b, i, h]) * D**-0.5
                out[b, i, h] = s.softmax(0) @ v[b, lo : i + 1, h // rep]
    return out


def test_window_rule_and_gqa_order():
    q = torch.randn(2, 13, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 13, 2, 8, dtype=torch.float64)
    v = torch.randn(2, 13, 2, 8, dtype=torch.float64)
    idx = torch.arange(13)[None].expand(2, 13)
    for window in (1, 4, 13, 50):
        o = sliding_window_attention(q, k, v, window_mask(idx, idx, window))
        torch.testing.assert_close(o, _naive(q, k, v, window))


def test_ring_write_keeps_last_slots():
    R = 5
    st = SWAState(keys=torch.zeros(1, R, 1, 2), values=torch.zeros(1, R, 1, 2),
                  token_index=torch.full((1, R), -1, dtype=torch.long))
    new = torch.arange(7.0).view(1, 7, 1, 1).expand(1, 7, 1, 2)
    idx = torch.arange(7)[None]
    keep = idx >= 7 - R
    ring_write(st, new, new, idx, keep)
    assert sorted(st.token_index[0].tolist()) == [2, 3, 4, 5, 6]
    for slot in range(R):
        assert st.keys[0, slot, 0, 0] == st.token_index[0, slot]
    # single-token path (graph-safe) with one row masked off
    ring_write(st, torch.full((1, 1, 1, 2), 7.0), torch.full((1, 1, 1, 2), 7.0), torch.tensor([[7]]),
               torch.tensor([[True]]))
    assert sorted(st.token_index[0].tolist()) == [3, 4, 5, 6, 7]
    before = st.keys.clone()
    ring_write(st, torch.full((1, 1, 1, 2), 9.0), torch.full((1, 1, 1, 2), 9.0), torch.tensor([[8]]),
               torch.tensor([[False]]))
    assert torch.equal(st.keys, before)


def test_ring_write_last_equals_masked_write():
    """The shape-only write (capturable chunk path) == the general write keeping the last R tokens."""
    R, B, G, D = 5, 2, 2, 3
    for T in (3, 5, 9):
        start = torch.tensor([0, 4])
        idx = start[:, None] + torch.arange(T)[None]
        k, v = torch.randn(B, T, G, D), torch.randn(B, T, G, D)
        a, b = (SWAState(keys=torch.randn(B, R, G, D), values=torch.randn(B, R, G, D),
                         token_index=torch.full((B, R), -1, dtype=torch.long)) for _ in range(2))
        b.keys.copy_(a.keys), b.values.copy_(a.values)
        ring_write(a, k, v, idx, idx > idx[:, -1:] - R)
        ring_write_last(b, k, v, idx)
        for x, y in ((a.keys, b.keys), (a.values, b.values), (a.token_index, b.token_index)):
            assert torch.equal(x, y)


def test_folded_gqa_attention_equals_repeated_kv():
    """The stream's frame prefill folds each kv head's query heads into the query axis: same result as the
    reference, which repeats the kv heads, under a window mask against a ring with empty slots."""
    from infinitevl.ops.swa import folded_gqa_attention

    g = torch.Generator().manual_seed(0)
    B, T, R, H, G, D = 2, 5, 11, 6, 2, 8
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, R + T, G, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, R + T, G, D, generator=g, dtype=torch.float64)
    ring_idx = torch.tensor([[*range(20, 31)], [*range(-1, 10)]])  # row 1 has an empty slot (-1)
    q_idx = torch.stack([torch.arange(31, 36), torch.arange(10, 15)])
    k_idx = torch.cat([ring_idx, q_idx], 1)
    mask = window_mask(q_idx, k_idx, 8, k_valid_BS=k_idx >= 0)
    torch.testing.assert_close(folded_gqa_attention(q, k, v, mask), sliding_window_attention(q, k, v, mask))


def test_causal_segments_equal_window_mask_within_the_window():
    """Packed samples no longer than the window: per-sample causal SDPA == the masked reference (values and
    gradients)."""
    from infinitevl.ops.swa import causal_segments_attention

    g = torch.Generator().manual_seed(1)
    lengths, H, G, D = [5, 1, 9, 3], 4, 2, 8
    T = sum(lengths)
    q, k, v = (torch.randn(1, T, n, D, generator=g, dtype=torch.float64, requires_grad=True) for n in (H, G, G))
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    idx = torch.cat([torch.arange(n) for n in lengths])[None]
    want = sliding_window_attention(q, k, v, window_mask(idx, idx, 9, q_seg_BT=seg, k_seg_BS=seg))
    got = causal_segments_attention(q, k, v, lengths)
    torch.testing.assert_close(got, want)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    gw = torch.autograd.grad((want * w).sum(), (q, k, v))
    gg = torch.autograd.grad((got * w).sum(), (q, k, v))
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b)
