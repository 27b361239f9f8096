"""Chunked prefill, token-by-token decode and one full forward compute the same function, on
sequences longer than the attention window, and the state never grows."""
import pytest
import torch

from infinitevl import InfiniteVL, preset


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return InfiniteVL(preset("tiny")).eval()


def _chunks(T, gen):
    sizes, left = [], T
    while left:
        s = int(torch.randint(1, 40, (1,), generator=gen))
        s = min(s, left)
        sizes.append(s)
        left -= s
    return sizes


@torch.no_grad()
def test_full_chunked_and_decode_agree(model):
    T = 150  # > window (32), > GDN chunk (64)
    ids = torch.randint(0, 1000, (2, T))
    full = model(ids)
    gen = torch.Generator().manual_seed(1)
    for trial in range(3):
        state = model.new_state(2)
        outs, s = [], 0
        for n in _chunks(T, gen):
            outs.append(model(ids[:, s : s + n], state=state))
            s += n
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-5, rtol=1e-4)
    # prefill half, then one token at a time
    state = model.new_state(2)
    outs = [model(ids[:, :60], state=state)]
    for t in range(60, T):
        outs.append(model(ids[:, t : t + 1], state=state))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-5, rtol=1e-4)
    assert state.seen.tolist() == [T, T]
    assert state.next_position.tolist() == [T, T]


@torch.no_grad()
def test_state_size_is_constant(model):
    state = model.new_state(1)
    model(torch.randint(0, 1000, (1, 10)), state=state)
    size_10 = state.nbytes()
    shapes = [t.shape for t in state.tensors()]
    for _ in range(4):
        model(torch.randint(0, 1000, (1, 500)), state=state)
    assert int(state.seen) == 2010
    assert state.nbytes() == size_10
    assert [t.shape for t in state.tensors()] == shapes


@torch.no_grad()
def test_clone_select_reset(model):
    ids = torch.randint(0, 1000, (2, 40))
    state = model.new_state(2)
    model(ids, state=state)
    branch = state.clone()
    nxt = torch.randint(0, 1000, (2, 3))
    a = model(nxt, state=branch)
    b = model(nxt, state=state.clone())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    row1 = state.select([1])
    torch.testing.assert_close(model(nxt[1:], state=row1), a[1:], atol=5e-5, rtol=1e-4)
    state.reset()
    fresh = model.new_state(2)
    assert all(torch.equal(x, y) for x, y in zip(state.tensors(), fresh.tensors()))


@torch.no_grad()
def test_bfloat16_keeps_float32_recurrent_state():
    m = InfiniteVL(preset("tiny")).to(torch.bfloat16).eval()
    state = m.new_state(1)
    m(torch.randint(0, 1000, (1, 20)), state=state)
    gdn = [layer for layer in state.layers if hasattr(layer, "recurrent")]
    assert all(layer.recurrent.dtype == torch.float32 for layer in gdn)
    assert torch.isfinite(m(torch.randint(0, 1000, (1, 1)), state=state)).all()
