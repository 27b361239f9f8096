"""Our Qwen2.5-VL vision encoder against transformers' implementation with the same weights: an
independent check of windowing, the full-attention blocks (per frame), rotary layout and the merger."""
import dataclasses

import pytest
import torch

from infinitevl import InfiniteVL
from infinitevl.model.vision import VisionTransformer

from ..conftest import REFERENCE_TINY


@pytest.fixture(scope="module")
def towers():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    ours = InfiniteVL.from_pretrained(REFERENCE_TINY / "model").visual
    fields = dataclasses.asdict(ours.config)
    hf_cfg = Qwen2_5_VLVisionConfig(**fields)
    hf_cfg._attn_implementation = "eager"
    theirs = Qwen2_5_VisionTransformerPretrainedModel(hf_cfg).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing)
    return ours, theirs


@pytest.mark.parametrize("grids", [[[1, 8, 12]], [[2, 4, 4]], [[1, 4, 8], [3, 10, 6]]])
def test_matches_transformers_vision_tower(towers, grids):
    ours, theirs = towers
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        a = ours(pixels, grid)
        b = theirs(pixels, grid_thw=grid)
        b = getattr(b, "pooler_output", None) if not torch.is_tensor(b) else b
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_grid_and_pixels(towers):
    ours, _ = towers
    with pytest.raises(ValueError, match="grid"):
        ours(torch.randn(16, 1176), torch.tensor([1, 4, 4]))
    with pytest.raises(ValueError, match="pixel values have shape"):
        ours(torch.randn(15, 1176), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        ours(torch.randn(15, 1176), torch.tensor([[1, 3, 5]]))
    assert isinstance(ours, VisionTransformer)


def test_images_of_one_forward_stay_independent_and_attention_never_spans_them(towers, monkeypatch):
    """Several images in one forward give what each gives alone, and no attention call sees more keys than the
    largest frame has patches (no [N, N] mask over all patches of the forward: memory and work per image)."""
    ours, _ = towers
    grids = [[1, 8, 12], [2, 4, 4], [1, 10, 6], [1, 8, 12]]
    pixels = [torch.randn(t * h * w, 3 * 2 * 14 * 14) for t, h, w in grids]
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((k.shape[-2], attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        together = ours(torch.cat(pixels), torch.tensor(grids))
        assert seen and max(s for s, _ in seen) <= max(h * w for _, h, w in grids)
        assert all(mask is None for _, mask in seen)
        alone = torch.cat([ours(p, torch.tensor([g])) for p, g in zip(pixels, grids)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_segments_batch_runs_by_length():
    from infinitevl.model.vision import Segments

    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    seg = Segments.of(ids, "cpu")
    assert seg.lengths == [3, 2]
    assert [i.tolist() for i in seg.index] == [[0, 1, 2, 5, 6, 7], [3, 4, 8, 9]]
    x = torch.arange(10.0)[:, None]
    assert torch.equal(torch.cat([x[i] for i in seg.index])[seg.restore], x)
    one = Segments.of(torch.tensor([0, 0, 1, 1]), "cpu")  # one length, in order: a plain reshape
    assert one.lengths == [2] and one.index == [None] and one.restore is None
