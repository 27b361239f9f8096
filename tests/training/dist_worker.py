"""Run under torchrun by test_distributed.py: the `infinitevl train sft` entry point once per config
given (DDP, then FSDP2), in the same two processes and process group to pay the start-up once. A `--fused`
argument forces, for the configs after it, the fast backend's training projections (layers/fuse.project_concat:
a layer's sibling projections as one matmul that saves the parameters themselves for backward), which otherwise
run only on CUDA; the SwiGLU over the fused gate|up (Triton) is then its PyTorch formula."""
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from infinitevl.cli_train import train_main
from infinitevl.training import distributed


CALLS = []


def force_fused_projections() -> None:
    from infinitevl.layers import fuse, gated_deltanet, mlp, swa_attention

    formula = types.ModuleType("infinitevl.ops.swiglu_train")
    formula.swiglu_packed = lambda gu: F.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1]
    formula.swiglu = lambda gate, up: F.silu(gate) * up
    sys.modules["infinitevl.ops.swiglu_train"] = formula
    import infinitevl.ops

    infinitevl.ops.swiglu_train = formula
    for mod in (gated_deltanet, swa_attention, mlp):
        mod.train_fusable = lambda x, linears, backend: (torch.is_grad_enabled()
                                                         and all(type(m) is nn.Linear for m in linears))
    apply = fuse._ConcatLinear.apply
    fuse._ConcatLinear.apply = lambda *a: CALLS.append(1) or apply(*a)


if __name__ == "__main__":
    d = distributed.init("cpu")
    try:
        for arg in sys.argv[1:]:
            if arg == "--fused":
                force_fused_projections()
            elif train_main(["sft", "--config", arg]) != 0:
                sys.exit(1)
        if d.main and CALLS:
            print(f"fused projection calls: {len(CALLS)}", flush=True)
    finally:
        distributed.shutdown(d)
