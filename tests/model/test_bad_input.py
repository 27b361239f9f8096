"""User mistakes raise ValueError naming the problem, before any kernel runs, and leave the state alone."""
import pytest
import torch
from safetensors.torch import load_file

from infinitevl import InfiniteVL

from ..conftest import REFERENCE_TINY


@pytest.fixture(scope="module")
def setup():
    return InfiniteVL.from_pretrained(REFERENCE_TINY / "model"), load_file(str(REFERENCE_TINY / "cases.safetensors"))


def test_image_token_feature_count_mismatch(setup):
    model, c = setup
    ids = c["image.input_ids"].clone()
    ids[0, (ids[0] == 1001).nonzero()[0]] = 5  # drop one placeholder
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        model(ids, pixel_values=c["image.pixel_values"], image_grid_thw=c["image.image_grid_thw"])


def test_placeholders_without_pixels_and_pixels_without_grid(setup):
    model, c = setup
    with pytest.raises(ValueError, match="no image pixels"):
        model(c["image.input_ids"])
    with pytest.raises(ValueError, match="without image_grid_thw"):
        model(c["image.input_ids"], pixel_values=c["image.pixel_values"])


def test_grid_pixel_shape_mismatch(setup):
    model, c = setup
    with pytest.raises(ValueError, match="pixel values have shape"):
        model(c["image.input_ids"], pixel_values=c["image.pixel_values"][:-4], image_grid_thw=c["image.image_grid_thw"])
    with pytest.raises(ValueError, match="pixel values have shape"):
        model(c["image.input_ids"], pixel_values=c["image.pixel_values"][:, :-1],
              image_grid_thw=c["image.image_grid_thw"])


@pytest.mark.parametrize("grid", [[1, 8, 8], [[1, -8, -8]], [[0, 8, 8]], [[1, 8]], [[1, 7.5, 8]]])
def test_malformed_grids(setup, grid):
    model, c = setup
    from infinitevl.inference import prefill

    for chunk in (None, 5):  # the whole prompt, and fed in chunks
        with pytest.raises(ValueError, match=r"image_grid_thw must be \[number of items, 3\]"):
            prefill(model, c["image.input_ids"], pixel_values=c["image.pixel_values"],
                    image_grid_thw=torch.tensor(grid), chunk_size=chunk)


def test_shapes_ids_and_state(setup):
    model, _ = setup
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, tokens\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[1, 5000]]))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(1, 0, dtype=torch.long))
    state = model.new_state(2)
    before = [t.clone() for t in state.tensors()]
    with pytest.raises(ValueError, match="state holds 2 rows"):
        model(torch.tensor([[1, 2]]), state=state)
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[1, 2], [3, 99999]]), state=state)
    assert all(torch.equal(a, b) for a, b in zip(before, state.tensors()))


def test_bad_input_leaves_state_unchanged(setup):
    model, c = setup
    state = model.new_state(1)
    model(c["text.input_ids"][:, :10], state=state)
    before = [t.clone() for t in state.tensors()]
    ids = c["image.input_ids"].clone()
    ids[0, (ids[0] == 1001).nonzero()[0]] = 5
    with pytest.raises(ValueError):
        model(ids, pixel_values=c["image.pixel_values"], image_grid_thw=c["image.image_grid_thw"], state=state)
    assert all(torch.equal(a, b) for a, b in zip(before, state.tensors()))


def test_from_pretrained_arguments(tmp_path):
    from infinitevl.model.infinitevl import check_dtype

    assert check_dtype("bfloat16") is torch.bfloat16 and check_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="int8"):
        check_dtype(torch.int8)
    with pytest.raises(ValueError, match="Hub ids are not downloaded here"):
        InfiniteVL.from_pretrained("hustvl/InfiniteVL")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        InfiniteVL.from_pretrained(tmp_path, device="gpu")
