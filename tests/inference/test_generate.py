"""The plain generation loop's chunked prompt: vision features computed as the chunks reach them."""
import pytest
import torch
from safetensors.torch import load_file

from infinitevl import InfiniteVL
from infinitevl.inference.generate import ChunkFeatures

from ..conftest import REFERENCE_TINY

KEYS = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]


@pytest.fixture(scope="module")
def reference():
    return InfiniteVL.from_pretrained(REFERENCE_TINY / "model"), load_file(str(REFERENCE_TINY / "cases.safetensors"))


def _case(cases, case):
    return cases[f"{case}.input_ids"], {k: cases[f"{case}.{k}"] for k in KEYS if f"{case}.{k}" in cases}


@pytest.mark.parametrize("case", ["image", "video", "two_images", "two_rows"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunk_embeddings_equal_the_whole_prompts(reference, case, chunk, monkeypatch):
    model, cases = reference
    if case == "two_rows":  # images in both rows of a batch: features fill the placeholders row by row
        ids, vision = _case(cases, "two_images")
        image, _ = _case(cases, "image")
        image = torch.cat([image, image[:, :1].expand(1, ids.shape[1] - image.shape[1])], 1)  # padded to one length
        ids = torch.cat([ids, image])
        vision = {"pixel_values": torch.cat([vision["pixel_values"], cases["image.pixel_values"]]),
                  "image_grid_thw": torch.cat([vision["image_grid_thw"], cases["image.image_grid_thw"]])}
    else:
        ids, vision = _case(cases, case)
    whole = model.embed(ids, **vision)
    calls = []
    tower = model.visual.forward
    monkeypatch.setattr(model.visual, "forward", lambda px, grid: (calls.append(grid.tolist()), tower(px, grid))[1])
    features = ChunkFeatures(model, ids, **vision)
    T = ids.shape[1]
    got = torch.cat([features.embed(s, min(T, s + chunk)) for s in range(0, T, chunk)], dim=1)
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)  # the tower sees fewer rows at a time: rounding
    assert all(k["cache"] == {} for k in features.kinds)  # every unit's features used and dropped
    units = [g for call in calls for g in call]
    assert all(t == 1 for t, _, _ in units)  # a video goes through the tower one temporal patch at a time
    assert len(units) == sum(int(g[0]) for g in torch.cat([v for k, v in vision.items() if "grid" in k]))
    if case == "video" and chunk < 7:
        assert len(calls) == 2  # its two temporal patches, each when a chunk reached it
