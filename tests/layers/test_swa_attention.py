"""SlidingWindowAttention's stateless paths: causal SDPA per sequence (sequences within the window) against the
masked path (what padding or a longer sequence takes)."""
import torch

from infinitevl import preset
from infinitevl.layers.swa_attention import SlidingWindowAttention
from infinitevl.ops.rope import mrope_cos_sin, rope_inv_freq


def _layer_and_inputs(T, window):
    torch.manual_seed(0)
    cfg = preset("tiny").text
    cfg.sliding_window = window
    layer = SlidingWindowAttention(cfg).double()
    x = torch.randn(2, T, cfg.hidden_size, dtype=torch.float64)
    pos = torch.arange(T)[None, None].expand(3, 2, T)
    cos, sin = mrope_cos_sin(pos, rope_inv_freq(cfg.head_dim, cfg.rope_theta), cfg.mrope_section)
    return layer, x, cos.double(), sin.double(), torch.arange(T)[None].expand(2, T)


def test_causal_path_equals_masked_path_within_the_window():
    layer, x, cos, sin, idx = _layer_and_inputs(T=12, window=12)
    fast = layer(x, cos, sin, tok_idx_BT=idx)  # no mask: causal SDPA
    masked = layer(x, cos, sin, tok_idx_BT=idx, mask_BT=torch.ones(2, 12, dtype=torch.long))  # the window mask
    torch.testing.assert_close(fast, masked)


def test_packed_rows_longer_than_the_window_take_the_mask():
    layer, x, cos, sin, idx = _layer_and_inputs(T=12, window=4)
    x = x[:1]
    seg = torch.tensor([[0] * 7 + [1] * 5])
    tok = torch.tensor([[*range(7), *range(5)]])
    packed = layer(x, cos[:1], sin[:1], tok_idx_BT=tok, seg_BT=seg, seq_lengths=[7, 5])
    for s, e in ((0, 7), (7, 12)):  # each sample alone, windowed through the mask (no packing)
        one = layer(x[:, s:e], cos[:1, s:e], sin[:1, s:e], tok_idx_BT=tok[:, s:e],
                    mask_BT=torch.ones(1, e - s, dtype=torch.long))
        torch.testing.assert_close(packed[:, s:e], one)


def test_packed_segments_are_kept_apart_on_every_path():
    """Within the window: with the lengths (causal per sequence) or with only the segment ids (the mask) the
    packed sequences never see each other: both equal each sequence run alone."""
    layer, x, cos, sin, idx = _layer_and_inputs(T=12, window=12)
    x, cos, sin = x[:1], cos[:1], sin[:1]
    seg = torch.tensor([[0] * 7 + [1] * 5])
    tok = torch.tensor([[*range(7), *range(5)]])
    with_lengths = layer(x, cos, sin, tok_idx_BT=tok, seg_BT=seg, seq_lengths=[7, 5])
    segments_only = layer(x, cos, sin, tok_idx_BT=tok, seg_BT=seg)
    alone = torch.cat([layer(x[:, s:e], cos[:, s:e], sin[:, s:e], tok_idx_BT=tok[:, s:e]) for s, e in ((0, 7), (7, 12))], 1)
    torch.testing.assert_close(with_lengths, alone)
    torch.testing.assert_close(segments_only, alone)
