import pytest
import torch
import torch.nn.functional as F

from infinitevl.ops.short_conv import short_conv, short_conv_packed


def _naive(x_TC, w_CW, history_TC=None):
    """Per token: silu(sum_i w[:, i] * x[t - W + 1 + i]), zeros before the start."""
    W = w_CW.shape[1]
    full = x_TC if history_TC is None else torch.cat([history_TC, x_TC])
    off = 0 if history_TC is None else history_TC.shape[0]
    out = []
    for t in range(off, full.shape[0]):
        acc = torch.zeros(x_TC.shape[1], dtype=x_TC.dtype)
        for i in range(W):
            s = t - W + 1 + i
            if s >= 0:
                acc = acc + w_CW[:, i] * full[s]
        out.append(F.silu(acc))
    return torch.stack(out)


def test_matches_naive_and_last_tap_is_current_token():
    x = torch.randn(1, 9, 5, dtype=torch.float64)
    w = torch.zeros(5, 4, dtype=torch.float64)
    w[:, -1] = 1.0  # identity kernel: output = silu(current input)
    y, _ = short_conv(x, w)
    torch.testing.assert_close(y, F.silu(x))
    w = torch.randn(5, 4, dtype=torch.float64)
    y, _ = short_conv(x, w)
    torch.testing.assert_close(y[0], _naive(x[0], w))


@pytest.mark.parametrize("split", [1, 2, 3, 8])
def test_state_carry_equals_one_call(split):
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    w = torch.randn(6, 4, dtype=torch.float64)
    y_full, s_full = short_conv(x, w)
    y1, s1 = short_conv(x[:, :split], w)
    y2, s2 = short_conv(x[:, split:], w, state_BCW=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full)
    torch.testing.assert_close(s2, s_full)


def test_mask_skips_pads_anywhere():
    x = torch.randn(1, 12, 3, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    state = torch.randn(1, 3, 3, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0]])
    y, s = short_conv(x, w, state_BCW=state, mask_BT=mask)
    keep = mask[0].bool()
    y_ref, s_ref = short_conv(x[:, keep], w, state_BCW=state)
    torch.testing.assert_close(y[:, keep], y_ref)
    torch.testing.assert_close(s, s_ref)
    assert torch.isfinite(y).all()


def test_packed_has_no_leakage():
    x = torch.randn(1, 10, 3, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    y = short_conv_packed(x, w, torch.tensor([0, 4, 10]))
    torch.testing.assert_close(y[:, :4], short_conv(x[:, :4], w)[0])
    torch.testing.assert_close(y[:, 4:], short_conv(x[:, 4:], w)[0])


def test_packed_equals_each_sequence_alone_with_gradients():
    lens = [1, 2, 3, 4, 9, 30, 1]  # shorter and longer than the kernel
    x = torch.randn(1, sum(lens), 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    y = short_conv_packed(x, w, cu)
    ref = torch.cat([short_conv(x[:, a:b], w)[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad((y * dy).sum(), (x, w)), torch.autograd.grad((ref * dy).sum(), (x, w))):
        torch.testing.assert_close(a, b)


def test_bad_state_shape():
    with pytest.raises(ValueError, match="state must be"):
        short_conv(torch.randn(1, 3, 4), torch.randn(4, 4), state_BCW=torch.zeros(1, 4, 4))
