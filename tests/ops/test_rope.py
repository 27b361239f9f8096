import pytest
import torch

from infinitevl.ops.rope import VisionTokens, apply_rope, get_rope_index, mrope_cos_sin, rope_inv_freq

SPEC = VisionTokens(image_token_id=9, video_token_id=8, spatial_merge_size=2, tokens_per_second=2)


def test_text_positions_and_padding():
    ids = torch.tensor([[5, 5, 5, 5], [0, 0, 5, 5]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    pos, nxt = get_rope_index(ids, SPEC, attention_mask_BT=mask)
    assert pos[:, 0].tolist() == [[0, 1, 2, 3]] * 3
    assert pos[:, 1, 2:].tolist() == [[0, 1]] * 3
    assert nxt.tolist() == [4, 2]


def test_image_block_layout():
    # text, vision_start, 4 image pads (grid 1x4x4 -> 2x2 merged), vision_end, text
    ids = torch.tensor([[1, 7, 9, 9, 9, 9, 6, 1]])
    pos, nxt = get_rope_index(ids, SPEC, image_grid_thw=torch.tensor([[1, 4, 4]]))
    t, h, w = pos[:, 0].tolist()
    assert t == [0, 1, 2, 2, 2, 2, 4, 5]
    assert h == [0, 1, 2, 2, 3, 3, 4, 5]
    assert w == [0, 1, 2, 3, 2, 3, 4, 5]
    assert nxt.tolist() == [6]


def test_video_time_axis_uses_integer_seconds_per_grid():
    ids = torch.tensor([[7] + [8] * 8 + [6]])
    grid = torch.tensor([[2, 4, 4]])
    pos, _ = get_rope_index(ids, SPEC, video_grid_thw=grid, second_per_grid_ts=[1.0])
    assert pos[0, 0, 1:9].tolist() == [1] * 4 + [3] * 4  # t = frame * 1 s * 2 tokens/s
    pos, _ = get_rope_index(ids, SPEC, video_grid_thw=grid, second_per_grid_ts=[0.5])
    assert pos[0, 0, 1:9].tolist() == [1] * 8  # int(0.5) == 0, as the published code does


def test_mismatches_raise():
    ids = torch.tensor([[1, 9, 9, 9, 1]])
    with pytest.raises(ValueError, match="placeholder tokens"):
        get_rope_index(ids, SPEC, image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="image_grid_thw"):
        get_rope_index(ids, SPEC)
    with pytest.raises(ValueError, match="placeholder runs"):
        get_rope_index(torch.tensor([[1, 2]]), SPEC, image_grid_thw=torch.tensor([[1, 4, 4]]))


def test_mrope_text_equals_1d_rope():
    pos = torch.arange(6).view(1, 1, 6).expand(3, 1, 6)
    cos, sin = mrope_cos_sin(pos, rope_inv_freq(16, 1e6), [2, 3, 3])
    inv = rope_inv_freq(16, 1e6)
    ang = torch.arange(6.0)[:, None] * inv
    torch.testing.assert_close(cos[0], torch.cat([ang, ang], -1).cos())
    x = torch.randn(1, 6, 2, 16)
    y = apply_rope(x, cos, sin)
    assert y.shape == x.shape
