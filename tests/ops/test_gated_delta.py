import pytest
import torch

from infinitevl.ops.gated_delta import chunk_gated_delta_rule, mask_padding, recurrent_gated_delta_rule


def _inputs(B=2, T=37, H=3, K=8, V=12, dtype=torch.float64):
    q = torch.randn(B, T, H, K, dtype=dtype)
    k = torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    g = -torch.rand(B, T, H, dtype=dtype) * 0.5
    beta = torch.rand(B, T, H, dtype=dtype)
    return q, k, v, g, beta


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T,chunk", [(37, 16), (64, 64), (5, 16), (1, 4)])
def test_chunk_equals_recurrent_fp64(with_state, T, chunk):
    q, k, v, g, beta = _inputs(T=T)
    s0 = torch.randn(2, 3, 8, 12, dtype=torch.float64) if with_state else None
    o_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o_c, s_c = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(o_c, o_r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s_c, s_r, atol=1e-10, rtol=1e-10)


def test_recurrence_matches_definition():
    """One step by hand: S = S*exp(g); S += beta k (v - S^T k)^T; o = S^T q (q, k normalised, q scaled)."""
    q, k, v, g, beta = _inputs(B=1, T=1, H=1, K=4, V=3)
    s0 = torch.randn(1, 1, 4, 3, dtype=torch.float64)
    o, s1 = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    qn = q[0, 0, 0] / torch.sqrt((q[0, 0, 0] ** 2).sum() + 1e-6) * 4**-0.5
    kn = k[0, 0, 0] / torch.sqrt((k[0, 0, 0] ** 2).sum() + 1e-6)
    S = s0[0, 0] * g[0, 0, 0].exp()
    S = S + beta[0, 0, 0] * torch.outer(kn, v[0, 0, 0] - S.T @ kn)
    torch.testing.assert_close(s1[0, 0], S)
    torch.testing.assert_close(o[0, 0, 0], S.T @ qn)


@pytest.mark.parametrize("rule", [recurrent_gated_delta_rule, chunk_gated_delta_rule])
def test_packed_equals_separate(rule):
    lens = [5, 19, 1, 11]
    q, k, v, g, beta = _inputs(B=1, T=sum(lens))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    s0 = torch.randn(len(lens), 3, 8, 12, dtype=torch.float64)
    o, s = rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, s_n = rule(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], initial_state=s0[n : n + 1],
                        output_final_state=True)
        torch.testing.assert_close(o[:, a:b], o_n)
        torch.testing.assert_close(s[n : n + 1], s_n)


@pytest.mark.parametrize("rule", [recurrent_gated_delta_rule, chunk_gated_delta_rule])
def test_masked_tokens_leave_state_untouched(rule):
    q, k, v, g, beta = _inputs(B=1, T=20)
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, [0, 1, 7, 19]] = 0
    g_m, beta_m = mask_padding(g, beta, mask)
    _, s_masked = rule(q, k, v, g_m, beta_m, output_final_state=True)
    keep = mask[0].bool()
    _, s_real = rule(q[:, keep], k[:, keep], v[:, keep], g[:, keep], beta[:, keep], output_final_state=True)
    torch.testing.assert_close(s_masked, s_real)


def test_float32_inputs_keep_float32_state():
    q, k, v, g, beta = (x.float() for x in _inputs(T=70))
    o, s = chunk_gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_bad_shapes_raise_value_error():
    q, k, v, g, beta = _inputs()
    with pytest.raises(ValueError, match="shapes disagree"):
        chunk_gated_delta_rule(q, k[:, :-1], v, g, beta)
    with pytest.raises(ValueError, match="initial_state"):
        recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(1, 3, 8, 12))
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 37]))


def test_packed_chunk_groups_by_length_forward_and_backward():
    """Packed sequences of different chunk counts (run as padded groups) == each sequence alone, grads too."""
    lens = [5, 19, 1, 11, 17, 8, 16]
    q, k, v, g, beta = (x.requires_grad_() for x in _inputs(B=1, T=sum(lens)))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    s0 = torch.randn(len(lens), 3, 8, 12, dtype=torch.float64, requires_grad=True)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                                  chunk_size=8)
    w_o, w_s = torch.randn_like(o), torch.randn_like(s)
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), (q, k, v, g, beta, s0))
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, s_n = recurrent_gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                                              initial_state=s0[n : n + 1], output_final_state=True)
        outs.append(o_n)
        finals.append(s_n)
    o_ref, s_ref = torch.cat(outs, 1), torch.cat(finals)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    ref = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), (q, k, v, g, beta, s0))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)
