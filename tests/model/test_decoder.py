"""TextDecoder: each layer's last residual add is left to the next norm (DecoderLayer.forward(unadded=True)); the
result must be exactly what chaining the layers' whole outputs gives, and every layer must still be called as a
module (FSDP's and PEFT's hooks)."""
import torch

from infinitevl import InfiniteVL
from infinitevl.model.config import InfiniteVLConfig

from ..training.conftest import TINY_ASSET


def test_decoder_equals_the_chain_of_whole_layer_outputs():
    cfg = InfiniteVLConfig.from_file(TINY_ASSET)
    torch.manual_seed(0)
    model = InfiniteVL(cfg).eval()
    dec = model.model
    x = torch.randn(2, 37, cfg.text.hidden_size)
    pos = torch.arange(37)[None, None].expand(3, 2, 37)
    calls = []
    for layer in dec.layers:
        layer.register_forward_pre_hook(lambda m, a, kw: calls.append(m), with_kwargs=True)
    with torch.no_grad():
        out = dec(x, pos)
        assert calls == list(dec.layers)
        kw = dict(dec.layer_inputs(x, pos), state=None)
        y = x
        for layer in dec.layers:
            y = layer(y, **kw)
        expected = dec.norm(y)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
