"""Padding must change nothing: a left-padded batch gives each prompt's own logits and tokens.
(The published code drops the attention mask inside Gated DeltaNet; we must not.)"""
import pytest
import torch
from safetensors.torch import load_file

from infinitevl import InfiniteVL, preset
from infinitevl.inference import generate

from ..conftest import REFERENCE_TINY


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return InfiniteVL(preset("tiny")).eval()


def _left_pad(rows, pad_id=0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.as_tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask


@torch.no_grad()
def test_left_padded_batch_equals_each_alone(model):
    rows = [torch.randint(0, 1000, (n,)).tolist() for n in (70, 9, 41)]
    ids, mask = _left_pad(rows)
    batched = model(ids, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = model(torch.tensor([r]))
        torch.testing.assert_close(batched[i, -len(r):], alone[0], atol=5e-5, rtol=1e-4)
    new = generate(model, ids, attention_mask_BT=mask, max_new_tokens=20)
    for i, r in enumerate(rows):
        assert new[i].tolist() == generate(model, torch.tensor([r]), max_new_tokens=20)[0].tolist()


@torch.no_grad()
def test_pads_anywhere_are_invisible(model):
    real = torch.randint(0, 1000, (1, 50))
    alone = model(real)
    holes = torch.ones(1, 64, dtype=torch.long)
    holes[0, [0, 3, 4, 20, 21, 22, 40, 50, 51, 60, 61, 63, 62, 59]] = 0
    ids = torch.zeros(1, 64, dtype=torch.long)
    ids[holes.bool()] = real[0]
    out = model(ids, attention_mask=holes)
    torch.testing.assert_close(out[holes.bool()], alone[0], atol=5e-5, rtol=1e-4)


@torch.no_grad()
def test_padded_multimodal_batch_matches_fixture_cases():
    model = InfiniteVL.from_pretrained(REFERENCE_TINY / "model")
    cases = load_file(str(REFERENCE_TINY / "cases.safetensors"))
    rows = [cases["text.input_ids"][0].tolist(), cases["image.input_ids"][0].tolist()]
    ids, mask = _left_pad(rows)
    out = model(ids, attention_mask=mask, pixel_values=cases["image.pixel_values"],
                image_grid_thw=cases["image.image_grid_thw"])
    for i, case in enumerate(["text", "image"]):
        n = len(rows[i])
        alone = model(cases[f"{case}.input_ids"], **({} if case == "text" else {
            "pixel_values": cases["image.pixel_values"], "image_grid_thw": cases["image.image_grid_thw"]}))
        torch.testing.assert_close(out[i, -n:], alone[0], atol=5e-5, rtol=1e-4)
    new = generate(model, ids, attention_mask_BT=mask, max_new_tokens=12, pixel_values=cases["image.pixel_values"],
                   image_grid_thw=cases["image.image_grid_thw"])
    for i, case in enumerate(["text", "image"]):
        want = cases[f"{case}.generated"][0, len(rows[i]):].tolist()
        assert new[i].tolist() == want
