"""layers/fuse.project_concat (training: sibling projections as one matmul) against the separate projections."""
import pytest
import torch
from torch import nn

from infinitevl.layers.fuse import concat_weights, project_concat, project_together


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


def test_concat_weights_is_a_view_only_for_adjacent_weights_of_its_dtype():
    base = torch.randn(12, 8)
    a, b = base[:5], base[5:]
    view = concat_weights([a, b], torch.float32)
    assert view.data_ptr() == base.data_ptr() and torch.equal(view, base)
    c = torch.randn(3, 8)
    for ws, dtype in (([a, c], torch.float32), ([b, a], torch.float32), ([a, b], torch.bfloat16)):
        out = concat_weights(ws, dtype)
        assert out.dtype == dtype and torch.equal(out, torch.cat([w.to(dtype) for w in ws]))
        assert all(out.data_ptr() != w.data_ptr() for w in ws)


def test_frozen_siblings_share_one_storage_for_the_run(tmp_path):
    """share_frozen_storage: a frozen MLP's gate and up become adjacent views (values, parameter objects, outputs
    and gradients unchanged); a group with a trained weight is left alone; a checkpoint of the shared model saves
    the values; unshare_storage separates them again."""
    from safetensors.torch import save_file

    from infinitevl.layers.fuse import share_frozen_storage, unshare_storage
    from infinitevl.layers.mlp import SwiGLU
    from infinitevl.training.checkpointing import full_model_state

    torch.manual_seed(0)
    model = nn.Sequential(SwiGLU(16, 24), SwiGLU(16, 24))
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[1].up_proj.weight.requires_grad_(False)  # gate trains: not shared
    params = [p for p in model[0].siblings()]
    before = [p.weight.clone() for p in params]
    x = torch.randn(3, 16, requires_grad=True)
    y0 = project_concat(x, model[0].siblings())
    (g0,) = torch.autograd.grad(y0.square().sum(), x)

    groups = share_frozen_storage(model)
    assert groups == [model[0].siblings()] and model[0].siblings() == params
    gate, up = (m.weight for m in params)
    assert up.data_ptr() == gate.data_ptr() + gate.numel() * gate.element_size()
    assert all(torch.equal(m.weight, w) for m, w in zip(params, before))
    assert all(m.weight.untyped_storage().nbytes() == m.weight.numel() * 4 for m in model[1].siblings())
    y1 = project_concat(x, model[0].siblings())
    (g1,) = torch.autograd.grad(y1.square().sum(), x)
    assert torch.equal(y0, y1) and torch.equal(g0, g1)

    weights = full_model_state(model, prefix="", tied=False)
    save_file(weights, str(tmp_path / "model.safetensors"))
    assert torch.equal(weights["0.up_proj.weight"], before[1])

    unshare_storage(groups)
    assert all(m.weight.untyped_storage().nbytes() == m.weight.numel() * 4 for m in params)
    assert all(torch.equal(m.weight, w) for m, w in zip(params, before))


def test_concat_weights_never_reads_past_the_weights():
    """A one-row weight can claim contiguity with any row stride: the view is built only from truly packed rows."""
    big = torch.arange(32.0).view(2, 16)
    w0 = big[:1, :8]
    w1 = big.view(-1)[8:16].view(1, 8)
    assert torch.equal(concat_weights([w0, w1], torch.float32), torch.cat([w0, w1]))


def test_weights_fused_for_inference_are_not_shared_again():
    """An MLP fused by fuse_projections (the vision tower's: rows padded, so gate and up are not adjacent) keeps
    its weights as views of the fused buffer."""
    from infinitevl.layers.fuse import share_frozen_storage
    from infinitevl.layers.mlp import SwiGLU

    mlp = SwiGLU(16, 20)
    mlp.fuse_projections()
    for p in mlp.parameters():
        p.requires_grad_(False)
    assert share_frozen_storage(mlp) == []
    assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up.weight.data_ptr()
