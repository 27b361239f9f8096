"""SwiGLU with fused projections: a hidden size that is not a multiple of 8 (the vision tower's 3420) is
zero-padded for cuBLAS's aligned kernels; outputs, parameter names and values stay those of the plain module."""
import torch
import torch.nn.functional as F

from infinitevl.layers.mlp import SwiGLU


def test_fused_padded_swiglu_equals_plain():
    torch.manual_seed(0)
    plain = SwiGLU(16, 42, bias=True).double()
    fused = SwiGLU(16, 42, bias=True).double()
    fused.load_state_dict(plain.state_dict())
    fused.fuse_projections()
    assert fused.down_padded and fused.gate_up.padded_sizes == [64, 64]
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x))
        # what the fast backend runs: the padded [gate | up] output through silu * up, then the padded down
        gu = fused.gate_up.project(x)
        assert gu.shape[-1] == 128 and torch.all(gu[..., 42:64] == 0) and torch.all(gu[..., 106:] == 0)
        h = F.silu(gu[..., :64]) * gu[..., 64:]
        torch.testing.assert_close(fused._down(h), plain(x))
    sd, ref = fused.state_dict(), plain.state_dict()
    assert sd.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(sd[name], ref[name], rtol=0, atol=0)


def test_aligned_swiglu_is_not_padded():
    m = SwiGLU(16, 48)
    m.fuse_projections()
    assert not m.down_padded and m.gate_up.padded_sizes == [48, 48] and m.gate_up.weight.shape == (96, 16)
