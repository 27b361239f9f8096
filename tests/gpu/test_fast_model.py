"""The whole model through the fast path on the GPU: parity with the published implementation's outputs,
prefill + decode == one forward, and CUDA-graph decode == eager decode."""
import pytest
import torch
from safetensors.torch import load_file

from infinitevl import InfiniteVL, preset
from infinitevl.inference import generate
from infinitevl.inference.engine import Engine

from ..conftest import REFERENCE_TINY

CASES = ["text", "image", "video", "two_images"]
VISION_KEYS = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"]


@pytest.fixture(scope="module")
def reference():
    assert REFERENCE_TINY.exists(), f"parity fixture missing at {REFERENCE_TINY} (set INFINITEVL_SHARED)"
    model = InfiniteVL.from_pretrained(REFERENCE_TINY / "model", device="cuda")
    assert model.set_backend("auto") == "fla"
    cases = {k: v.cuda() for k, v in load_file(str(REFERENCE_TINY / "cases.safetensors")).items()}
    return model, cases


def _vision(cases, case):
    return {k: cases[f"{case}.{k}"] for k in VISION_KEYS if f"{case}.{k}" in cases}


@pytest.mark.parametrize("case", CASES)
def test_fast_logits_match_published_reference(reference, case):
    model, cases = reference
    with torch.no_grad():
        logits = model(cases[f"{case}.input_ids"], **_vision(cases, case))
    diff = (logits - cases[f"{case}.logits"]).abs()
    assert diff.max() < 5e-2 and diff.mean() < 2e-3, (case, diff.max().item(), diff.mean().item())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_engine_greedy_matches_published_reference(reference, case, cuda_graph):
    model, cases = reference
    ids = cases[f"{case}.input_ids"]
    want = cases[f"{case}.generated"][:, ids.shape[1]:]
    engine = Engine(model, cuda_graph=cuda_graph)
    got = engine.generate(ids, max_new_tokens=want.shape[1], prefill_chunk_size=7, **_vision(cases, case))
    assert got.tolist() == want.cpu().tolist()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return InfiniteVL(preset("tiny")).cuda().eval()


def test_chunked_prefill_and_decode_equal_one_forward(tiny):
    tiny.set_backend("fla")
    ids = torch.randint(0, 1000, (2, 150), device="cuda")
    with torch.no_grad():
        full = tiny(ids)
        st = tiny.new_state(2)
        parts = [tiny(ids[:, :70], state=st), tiny(ids[:, 70:101], state=st)]
        parts += [tiny(ids[:, t : t + 1], state=st) for t in range(101, 150)]
    got = torch.cat(parts, dim=1)
    assert (got - full).abs().max() < 2e-2, (got - full).abs().max()


def test_fast_decode_steps_match_reference_decode(tiny):
    ids = torch.randint(0, 1000, (3, 100), device="cuda")
    outs = {}
    for backend in ("torch", "fla"):
        tiny.set_backend(backend)
        with torch.no_grad():
            st = tiny.new_state(3)
            tiny(ids[:, :60], state=st)
            outs[backend] = torch.cat([tiny(ids[:, t : t + 1], state=st) for t in range(60, 100)], 1)
    assert (outs["fla"] - outs["torch"]).abs().max() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_decode_equals_eager_for_200_steps(tiny, dtype):
    model = tiny.to(dtype)
    ids = torch.randint(0, 1000, (3, 77), device="cuda")
    eager = Engine(model, max_batch_size=4, cuda_graph=False).generate(ids, max_new_tokens=200)
    graph_engine = Engine(model, max_batch_size=4, cuda_graph=True)
    graphed = graph_engine.generate(ids, max_new_tokens=200)
    assert graph_engine.backend == "fla"
    assert graphed.shape == (3, 200) and graphed.tolist() == eager.tolist()
    # the same graph serves a second request (state and buffers are reset between requests)
    assert graph_engine.generate(ids, max_new_tokens=200).tolist() == eager.tolist()
    tiny.float()


def test_engine_matches_reference_loop_on_gpu(tiny):
    """The fast engine against the plain loop with the reference kernels (float32, a stop token)."""
    tiny.float()
    # 12 prompt tokens: prefill takes the fused recurrent kernel (no TF32 matmuls), so greedy tokens must agree
    ids = torch.randint(0, 1000, (2, 12), device="cuda")
    tiny.set_backend("torch")
    want = generate(tiny, ids, max_new_tokens=45)
    stop = int(want[1, 40])
    want = generate(tiny, ids, max_new_tokens=45, stop_token_ids=[stop])
    got = Engine(tiny, max_batch_size=2).generate(ids, max_new_tokens=45, stop_token_ids=[stop])
    assert got.tolist() == want.cpu().tolist()
