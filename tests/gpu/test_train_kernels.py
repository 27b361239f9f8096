"""Training's fused GPU kernels (ops/train_kernels, swiglu_train, rms_norm_train, short_conv_train; fuse.project_concat)
against the layers' PyTorch formulas."""
import pytest
import torch

from infinitevl.layers.mlp import SwiGLU
from infinitevl.layers.norm import GatedRMSNorm, RMSNorm
from .conftest import rel

DEV = "cuda"


def _grads(fn, inputs, dy):
    for t in inputs:
        t.grad = None
    out = fn()
    (out.float() * dy).sum().backward()
    return out.detach(), [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("autocast", [False, True])
def test_rms_norm_matches_the_layer_formula_with_gradients(autocast):
    torch.manual_seed(0)
    x = torch.randn(2, 300, 2048, device=DEV, requires_grad=True)
    norm = RMSNorm(2048, eps=1e-6).to(DEV)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    dy = torch.randn(2, 300, 2048, device=DEV)
    results = {}
    for backend in ("torch", "fla"):
        norm.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            results[backend] = _grads(lambda: norm(x), [x, norm.weight], dy)
    (y_ref, g_ref), (y, g) = results["torch"], results["fla"]
    # under autocast the fused norm writes bf16: what the next linear layer would have cast the float32 output to
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert rel(y.float(), y_ref.to(y.dtype).float()) < 1e-3
    assert rel(g[0], g_ref[0]) < 1e-2 if autocast else rel(g[0], g_ref[0]) < 1e-4
    assert rel(g[1], g_ref[1]) < 1e-2 if autocast else rel(g[1], g_ref[1]) < 1e-4


@pytest.mark.parametrize("h_dtype", [torch.bfloat16, torch.float32])
def test_add_rms_norm_matches_the_layer_formula_with_gradients(h_dtype):
    """RMSNorm.add_and_norm on backend 'fla' (train_kernels.add_rms_norm): the float32 residual stream plus a
    sub-layer's update, under bf16 autocast as in training; both outputs carry a gradient (the stream goes on to
    the next layer, the norm to the sub-layer), so backward adds them inside the kernel."""
    torch.manual_seed(0)
    x = torch.randn(2, 300, 2048, device=DEV, requires_grad=True)
    h = torch.randn(2, 300, 2048, device=DEV).to(h_dtype).requires_grad_()
    norm = RMSNorm(2048, eps=1e-6).to(DEV)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    ds, dy = torch.randn(2, 300, 2048, device=DEV), torch.randn(2, 300, 2048, device=DEV)
    results = {}
    for backend in ("torch", "fla"):
        norm.backend = backend
        for t in (x, h, norm.weight):
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            s, y = norm.add_and_norm(x, h)
        ((s.float() * ds).sum() + (y.float() * dy).sum()).backward()
        results[backend] = (s.detach(), y.detach(), [t.grad.clone() for t in (x, h, norm.weight)])
    (s_ref, y_ref, g_ref), (s, y, g) = results["torch"], results["fla"]
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert g[0].dtype == torch.float32 and g[1].dtype == h_dtype
    assert torch.equal(s, s_ref)  # the stream itself: the same float32 add
    assert rel(y.float(), y_ref.to(torch.bfloat16).float()) < 1e-3
    for a, b in zip(g, g_ref):
        assert rel(a.float(), b.float()) < 1e-2


def test_add_and_norm_without_gradients_takes_mixed_dtypes():
    """A float32 stream plus a bf16 update under no_grad on the fast backend (frozen student layers in layer-wise
    distillation run so inside the trainer's autocast): the fused inference kernel wants equal dtypes, so this
    takes the formula, with the formula's values; the final norm's unused stream output needs no gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 50, 256, device=DEV)
    h = torch.randn(3, 50, 256, device=DEV, dtype=torch.bfloat16)
    norm = RMSNorm(256, eps=1e-6).to(DEV)
    out = {}
    for backend in ("torch", "fla"):
        norm.backend = backend
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out[backend] = norm.add_and_norm(x, h)
    assert torch.equal(out["fla"][0], out["torch"][0])
    assert rel(out["fla"][1].float(), out["torch"][1].float()) < 1e-3
    # grad mode, only the norm output used: the stream's gradient comes from the norm alone
    xg = x.clone().requires_grad_()
    norm.backend = "fla"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = norm.add_and_norm(xg, h)[1]
    y.float().sum().backward()
    norm.backend = "torch"
    xr = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yr = norm.add_and_norm(xr, h)[1]
    yr.float().sum().backward()
    assert rel(xg.grad, xr.grad) < 1e-2


def test_gated_rms_norm_matches_the_layer_formula_with_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 100, 16, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    gate = torch.randn(2, 100, 16, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    norm = GatedRMSNorm(128, eps=1e-6).to(DEV)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    dy = torch.randn(2, 100, 16, 128, device=DEV)
    results = {}
    for backend in ("torch", "fla"):
        norm.backend = backend
        results[backend] = _grads(lambda: norm(x, gate), [x, gate, norm.weight], dy)
    (y_ref, g_ref), (y, g) = results["torch"], results["fla"]
    assert y.dtype == torch.bfloat16 and rel(y, y_ref) < 1e-2
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-2


def test_swiglu_mlp_matches_the_layer_formula_with_gradients():
    torch.manual_seed(0)
    mlp = SwiGLU(256, 688).to(DEV)
    x = torch.randn(3, 70, 256, device=DEV, requires_grad=True)
    dy = torch.randn(3, 70, 256, device=DEV)
    results = {}
    for backend in ("torch", "fla"):
        mlp.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results[backend] = _grads(lambda: mlp(x), [x, mlp.gate_proj.weight, mlp.up_proj.weight,
                                                       mlp.down_proj.weight], dy)
    (y_ref, g_ref), (y, g) = results["torch"], results["fla"]
    assert rel(y, y_ref) < 1e-2
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-2


@pytest.mark.parametrize("head_trains,h_dtype", [(False, torch.bfloat16), (True, torch.bfloat16), (True, torch.float32)])
def test_fused_linear_cross_entropy_matches_the_chunked_reference(head_trains, h_dtype):
    """losses.cross_entropy_sum on backend 'fla' (ops/train_kernels.linear_cross_entropy_sum) against its
    PyTorch path, under bf16 autocast as in training (hidden states in bf16, as the fused RMSNorm writes them):
    loss, d hidden and (when the head trains) d head. The 4B vocabulary: fla's forward splits it into 64K-wide
    blocks and reduces them."""
    from infinitevl.training.losses import cross_entropy_sum

    torch.manual_seed(0)
    n, d, v = 3000, 256, 151936  # a chunk boundary inside (chunk 2048)
    h = torch.randn(n, d, device=DEV).to(h_dtype).requires_grad_(True)
    w = (torch.randn(v, d, device=DEV) / d**0.5).requires_grad_(head_trains)
    t = torch.randint(0, v, (n,), device=DEV)
    t[::7] = -100  # ignored positions
    results = {}
    for backend in ("torch", "fla"):
        h.grad = w.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cross_entropy_sum(h, w, t, chunk=2048, backend=backend)
        (loss * 0.37).backward()  # a scale, as the trainer's 1/units
        results[backend] = (loss.detach(), h.grad.clone(), None if w.grad is None else w.grad.clone())
    (l_ref, dh_ref, dw_ref), (l, dh, dw) = results["torch"], results["fla"]
    assert rel(l, l_ref) < 1e-5
    assert dh.dtype == h_dtype and rel(dh, dh_ref) < 1e-2
    assert (dw is None) == (not head_trains)
    if head_trains:
        assert rel(dw, dw_ref) < 1e-2


@pytest.mark.parametrize("kind", ["linear_attention", "sliding_attention"])
def test_projections_in_one_matmul_match_separate_ones_in_training(kind, monkeypatch):
    """layers/fuse.project_together (training on the fast backend: a layer's sibling projections as one matmul)
    against the separate projections: the layer's output and every gradient, under bf16 autocast, packed row."""
    import importlib

    from infinitevl.model.config import preset
    from infinitevl.model.decoder import TextDecoder

    cfg = preset("tiny").text
    torch.manual_seed(0)
    decoder = TextDecoder(cfg).to(DEV).train()
    for m in decoder.modules():
        if hasattr(m, "backend"):
            m.backend = "fla"
    i = cfg.layer_types.index(kind)
    layer = decoder.layers[i]
    mod = importlib.import_module("infinitevl.layers." + ("gated_deltanet" if kind == "linear_attention" else "swa_attention"))
    x = torch.randn(1, 300, cfg.hidden_size, device=DEV, requires_grad=True)
    pos = torch.cat([torch.arange(100), torch.arange(200)]).to(DEV).expand(3, 1, 300)
    kw = decoder.layer_inputs(x, pos, cu_seqlens=torch.tensor([0, 100, 300], device=DEV, dtype=torch.int32))
    dy = torch.randn_like(x)
    results = []
    for together in (True, False):
        fused_calls = []
        real = mod.project_together
        monkeypatch.setattr(mod, "project_together", lambda *a: fused_calls.append(1) or real(*a))
        if not together:
            monkeypatch.setattr(mod, "train_fusable", lambda *a: False)
        layer.zero_grad()
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x, **kw, state=None)
        (y.float() * dy).sum().backward()
        assert len(fused_calls) == (1 if together else 0)
        results.append((y.detach().float(), [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]))
    (y1, g1), (y0, g0) = results
    assert rel(y1, y0) < 2e-3
    assert len(g1) == len(g0)
    for a, b in zip(g1, g0):
        assert rel(a, b) < 1e-2


def test_gates_inside_the_chunk_kernel_match_the_gate_formulas():
    """ops/gated_delta/fla.chunk_gated_delta_rule_from_gates (training: fla computes g = -exp(A_log) softplus(a +
    dt_bias) and beta = sigmoid(b) inside its kernels) against the same chunk kernel fed with the layer's PyTorch
    gate formulas: output and every gradient, A_log and dt_bias included, packed sequences, bf16 inputs; both
    against the float32 reference too (fla's TF32)."""
    from infinitevl.ops.gated_delta import fla as fla_rule, reference

    torch.manual_seed(0)
    B, T, H, K = 1, 300, 4, 64
    cu = torch.tensor([0, 100, 300], device=DEV)
    q, k, v = (torch.randn(B, T, H, K, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    a, b = (torch.randn(B, T, H, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    A_log = torch.empty(H, device=DEV).uniform_(0, 2.7).requires_grad_()
    dt_bias = torch.empty(H, device=DEV).uniform_(-4, 0).requires_grad_()
    do = torch.randn(B, T, H, K, device=DEV)
    leaves = [q, k, v, a, b, A_log, dt_bias]

    def formulas():
        g = -A_log.exp() * torch.nn.functional.softplus(a.float() + dt_bias)
        return g, b.float().sigmoid()

    def in_kernel():
        return fla_rule.chunk_gated_delta_rule_from_gates(q, k, v, a, b, A_log, dt_bias, cu_seqlens=cu)

    def fla_formulas():
        return fla_rule.chunk_gated_delta_rule(q, k, v, *formulas(), cu_seqlens=cu)[0]

    def ref():
        return reference.chunk_gated_delta_rule(q.float(), k.float(), v.float(), *formulas(), cu_seqlens=cu)[0]

    results = []
    for fn in (in_kernel, fla_formulas, ref):
        for t in leaves:
            t.grad = None
        o = fn()
        (o.float() * do).sum().backward()
        results.append((o.detach().float(), [t.grad.float().clone() for t in leaves]))
    (o1, g1), (o0, g0), (o_ref, g_ref) = results
    assert rel(o1, o0) < 1e-3
    for name, x, y in zip("q k v a b A_log dt_bias".split(), g1, g0):
        assert rel(x, y) < 5e-3, name
    assert rel(o1, o_ref) < 1e-2
    for name, x, y in zip("q k v a b A_log dt_bias".split(), g1, g_ref):
        assert rel(x, y) < 5e-2, name


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C,W", [(2048, 4), (4096, 4), (200, 3), (64, 2)])
def test_training_conv_matches_the_reference_with_gradients(packed, dtype, C, W):
    """ops/short_conv_train.short_conv (training's short conv + SiLU, forward and backward kernels) against the
    reference conv in float32: the output, the input gradient and the float32 weight gradient. A packed row (no tap
    crosses a boundary; one-token samples included) or a batch of two rows; x a strided slice of a wider fused
    projection output, as in training (the columns after it get no gradient)."""
    from infinitevl.ops.short_conv import short_conv, short_conv_packed
    from infinitevl.ops.short_conv_train import seq_starts, short_conv as train_conv

    torch.manual_seed(0)
    B, T = (1, 1500) if packed else (2, 333)
    cu = torch.tensor([0, 5, 6, 7, 300, 1100, 1500], device=DEV, dtype=torch.int32) if packed else None
    fused = torch.randn(B, T, C + 40, device=DEV, dtype=dtype, requires_grad=True)
    x = fused[..., :C]
    w = (torch.randn(C, W, device=DEV) * 0.5).requires_grad_()
    dy = torch.randn(B, T, C, device=DEV)

    def grads(y):
        fused.grad = w.grad = None
        (y.float() * dy).sum().backward()
        return y.detach().float(), fused.grad.float().clone(), w.grad.clone()

    y = train_conv(x, w, starts_T=seq_starts(cu, T, DEV))
    assert y.dtype == dtype and y.is_contiguous()
    got = grads(y)
    want = grads(short_conv_packed(x.float(), w, cu) if packed else short_conv(x.float(), w)[0])
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's and the pre-activation's rounding
    for a, b in zip(got, want):
        assert rel(a, b) < tol
    assert got[1][..., C:].abs().max() == 0


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dtype,I", [(torch.float32, 688), (torch.float32, 37), (torch.bfloat16, 11008),
                                     (torch.bfloat16, 3420)])
def test_training_swiglu_matches_the_formula_with_gradients(packed, dtype, I):
    """ops/swiglu_train against silu(gate) * up in float64: values and both gradients; rows and columns that do
    not fill a tile, gate and up as the two halves of one tensor (their gradient one tensor too) or as two."""
    from infinitevl.ops.swiglu_train import swiglu, swiglu_packed

    torch.manual_seed(0)
    N = 83
    gu = (torch.randn(N, 2 * I, device=DEV) * 3).to(dtype).requires_grad_()
    dz = torch.randn(N, I, device=DEV, dtype=torch.float64)
    if packed:
        z = swiglu_packed(gu.view(1, N, 2 * I))[0]
        (z.double() * dz).sum().backward()
        grads = [gu.grad[:, :I], gu.grad[:, I:]]
    else:
        g, u = (t.detach().clone().requires_grad_() for t in gu.split(I, -1))
        z = swiglu(g, u)
        (z.double() * dz).sum().backward()
        grads = [g.grad, u.grad]
    g64, u64 = (t.detach().double().requires_grad_() for t in gu.split(I, -1))
    z64 = torch.nn.functional.silu(g64) * u64
    (z64 * dz).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert z.dtype == dtype and rel(z, z64) < tol
    for a, b in zip(grads, (g64.grad, u64.grad)):
        assert a.dtype == dtype and rel(a, b) < tol


@pytest.mark.parametrize("D", [2048, 1000])
@pytest.mark.parametrize("fused_add,h_dtype", [(False, None), (True, torch.bfloat16), (True, torch.float32)])
@pytest.mark.parametrize("need_dw", [False, True])
def test_rms_norm_backward_kernel_matches_the_formula(D, fused_add, h_dtype, need_dw):
    """ops/rms_norm_train against autograd of w * s * rstd in float64 (dy rounded to bf16 as it arrives): dx with
    the stream's gradient added when the add is fused, its copy in the update's dtype, dw only when asked; rows
    that do not fill a program, a width that is not a power of two."""
    from infinitevl.ops.rms_norm_train import rms_norm_backward

    torch.manual_seed(0)
    N, eps = 301, 1e-6
    s = torch.randn(N, D, device=DEV, dtype=torch.float64) * 2
    w = torch.rand(D, device=DEV, dtype=torch.float64) + 0.5
    dy = torch.randn(N, D, device=DEV).to(torch.bfloat16)
    ds = torch.randn(N, D, device=DEV) if fused_add else None
    s64, w64 = s.clone().requires_grad_(), w.clone().requires_grad_()
    (w64 * s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps) * dy.double()).sum().backward()
    ref_dx = s64.grad + (ds.double() if fused_add else 0)
    rstd = torch.rsqrt(s.pow(2).mean(-1) + eps).float()
    dx, dh, dw = rms_norm_backward(dy, s.float(), w.float(), rstd, ds=ds, h_dtype=h_dtype, need_dw=need_dw)
    assert dx.dtype == torch.float32 and rel(dx, ref_dx) < 1e-5
    if h_dtype == torch.bfloat16:
        assert dh.dtype == torch.bfloat16 and rel(dh, ref_dx) < 1e-2
    else:
        assert dh is None  # the same dtype as the stream: dx serves both
    if need_dw:
        assert dw.dtype == torch.float32 and rel(dw, w64.grad) < 1e-5
    else:
        assert dw is None
