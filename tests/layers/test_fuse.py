"""layers/fuse.project_concat (training: sibling projections as one matmul) against the separate projections."""
import pytest
import torch
from torch import nn

from infinitevl.layers.fuse import project_concat, project_together


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", [(), (1,), (0, 1, 2)])
@pytest.mark.parametrize("autocast", [False, True])
def test_projections_in_one_matmul_equal_separate_ones(bias, frozen, autocast):
    """Outputs, dx and every weight's and bias's gradient (None for a frozen one), in the parameter's dtype."""
    torch.manual_seed(0)
    lins = [nn.Linear(16, n, bias=bias) for n in (8, 4, 12)]
    for i in frozen:
        for p in lins[i].parameters():
            p.requires_grad_(False)
    x = torch.randn(2, 5, 16, requires_grad=True)
    dy = torch.randn(2, 5, 24)
    results = []
    for fused in (True, False):
        x.grad = None
        for m in lins:
            m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = project_concat(x, lins) if fused else torch.cat([m(x) for m in lins], -1)
        (y.float() * dy).sum().backward()
        results.append([y, x.grad] + [p.grad for m in lins for p in m.parameters()])
    tol = 1e-2 if autocast else 1e-6
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())


def test_the_concatenated_weight_is_not_kept_for_backward():
    """Only the weights themselves (and x) are saved: nothing the size of the concatenation is allocated."""
    lins = [nn.Linear(32, 64) for _ in range(2)]
    x = torch.randn(4, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q, k = project_together(x, lins)
    params = {p.data_ptr() for m in lins for p in m.parameters()}
    assert all(t.data_ptr() in params | {x.data_ptr()} for t in saved)
    (q.sum() + 2 * k.sum()).backward()
    assert torch.equal(lins[1].bias.grad, torch.full((64,), 8.0))


def test_x_without_gradient_and_a_strided_output_gradient():
    """Only the weights train (x is data) and the output's gradient arrives transposed (not contiguous)."""
    torch.manual_seed(0)
    lins = [nn.Linear(8, n) for n in (6, 10)]
    x = torch.randn(5, 8)
    dy = torch.randn(16, 5).t()
    grads = []
    for fused in (True, False):
        for m in lins:
            m.zero_grad()
        y = project_concat(x, lins) if fused else torch.cat([m(x) for m in lins], -1)
        y.backward(dy)
        grads.append([p.grad for m in lins for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_projections_must_agree_on_bias():
    with pytest.raises(ValueError, match="bias"):
        project_concat(torch.randn(2, 8), [nn.Linear(8, 4), nn.Linear(8, 4, bias=False)])
