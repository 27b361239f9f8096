"""The parity contract with the published implementation (../shared/fixtures/reference-tiny/README.md).

The reference ran on a GPU with TF32 in the vision patch conv and the GDN chunk kernel, so the contract
is max abs < 5e-2, mean abs < 2e-3 on every case and identical greedy tokens. Never skip this test.
"""
import pytest
import torch
from safetensors.torch import load_file

from infinitevl import InfiniteVL
from infinitevl.inference import generate

from ..conftest import REFERENCE_TINY

CASES = ["text", "image", "video", "two_images"]
VISION_KEYS = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"]


@pytest.fixture(scope="module")
def reference():
    assert REFERENCE_TINY.exists(), f"parity fixture missing at {REFERENCE_TINY}: it must be present"
    model = InfiniteVL.from_pretrained(REFERENCE_TINY / "model")
    return model, load_file(str(REFERENCE_TINY / "cases.safetensors"))


def _vision(cases, case):
    return {k: cases[f"{case}.{k}"] for k in VISION_KEYS if f"{case}.{k}" in cases}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(reference, case):
    model, cases = reference
    with torch.no_grad():
        logits = model(cases[f"{case}.input_ids"], **_vision(cases, case))
    diff = (logits - cases[f"{case}.logits"]).abs()
    assert diff.max() < 5e-2 and diff.mean() < 2e-3, (case, diff.max().item(), diff.mean().item())


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_reference(reference, case):
    model, cases = reference
    ids = cases[f"{case}.input_ids"]
    want = cases[f"{case}.generated"][:, ids.shape[1]:]
    got = generate(model, ids, max_new_tokens=want.shape[1], **_vision(cases, case))
    assert got.tolist() == want.tolist()
    # the same through chunked prefill (chunks straddle the image and the 32-token window)
    got = generate(model, ids, max_new_tokens=want.shape[1], prefill_chunk_size=7, **_vision(cases, case))
    assert got.tolist() == want.tolist()
