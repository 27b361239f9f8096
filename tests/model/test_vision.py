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
