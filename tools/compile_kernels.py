"""Compile the GPU paths' Triton kernels for a GPU target on a machine without a GPU.

    pip install triton flash-linear-attention    # CPU is enough; no CUDA needed
    python tools/compile_kernels.py [--arch 90]

Why: the Triton interpreter (TRITON_INTERPRET=1) runs kernels on CPU but does not type-check them as the
compiler does (a variable redefined with another type in a branch passes there and fails on the GPU), and
device time is scarce. This runs the model's fast paths (backend 'fla') on CPU tensors with every kernel
launch turned into a compile for the target (Triton's front end, LLVM and ptxas: what a GPU would run first):
- inference on the tiny model: a prefill continuing a state, a decode step and a stream's frame step;
- the 4B shapes of the stream ops (the three short convs of a frame, the frame's SWA block attention);
- the 4B shapes of the training convs (`ops/short_conv_train`) and SwiGLU (`ops/swiglu_train`), forward and
  backward, and the training RMSNorm's backward (`ops/rms_norm_train`);
- training on the tiny model: a packed row, forward and backward (fla's GDN and l2norm kernels with
  backward; the fused training norms and cross-entropy run only on CUDA tensors, so not here).
Autotuned kernels compile every config. Outputs are garbage (nothing runs): this checks compilation only.
Exit status 0 when everything compiled; a compile error is raised with Triton's message.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


class _Props:  # what fla and our heuristics read of the device (an H100)
    name = "NVIDIA H100 80GB HBM3"
    major, minor = 9, 0
    multi_processor_count = 132
    total_memory = 80 * 2**30
    max_shared_memory_per_block_optin = 232448
    L2_cache_size = 50 * 2**20


def compile_only(arch: int) -> collections.Counter:
    """Makes every Triton launch a compile for sm_`arch`; returns the counter of compiled launches by kernel."""
    sys.modules.setdefault("tilelang", None)  # fla's optional TileLang kernels: the Triton ones are checked
    sys.modules.setdefault("tvm_ffi", None)
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver as driver_config
    from triton.runtime import jit

    class CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):  # autotuning: compile each config, report equal times
            return lambda fn, quantiles=None, **kw: (fn(), [1.0, 1.0, 1.0])[1]

        def get_empty_cache_for_benchmark(self):
            return torch.empty(1)

        def clear_cache(self, cache):
            pass

        def is_active(self):
            return True

    driver_config.set_active(CompileOnlyDriver())
    torch.cuda.get_device_name = lambda *a, **k: _Props.name
    torch.cuda.get_device_capability = lambda *a, **k: (arch // 10, arch % 10)
    torch.cuda.get_device_properties = lambda *a, **k: _Props()
    seen: collections.Counter = collections.Counter()
    launch = jit.JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        seen[self.fn.__name__] += 1
        return launch(self, *args, grid=grid, warmup=True, **kwargs)

    jit.JITFunction.run = compile_instead
    return seen


def text_ids(model, B: int, T: int) -> torch.Tensor:
    """Random ids below the vision special tokens (a placeholder id would need pixels)."""
    c = model.config
    hi = min(c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id, c.text.vocab_size)
    return torch.randint(0, hi, (B, T), generator=torch.Generator().manual_seed(0))


def fast_backend(model) -> None:
    """What `set_backend('fla', vision=True)` sets, without its check that the model sits on a GPU."""
    for root in (model.model, model.visual):
        for module in root.modules():
            if hasattr(module, "backend"):
                module.backend = "fla"


@torch.no_grad()
def inference(model) -> None:
    from infinitevl.inference.frame_step import FrameStep
    from infinitevl.inference.frames import FrameSpec

    fast_backend(model)
    model.fuse_projections(vision=True)
    state = model.new_state(2)
    ids = text_ids(model, 2, 40)
    model(ids, state=state, logits_to_keep=1)  # prefill continuing a state
    model(ids[:, :1], state=state, logits_to_keep=1)  # decode
    step = FrameStep(model, state, FrameSpec(height=56, width=84), cuda_graph=False)
    step.run(torch.randint(0, 255, (2, 56, 84, 3), dtype=torch.uint8), torch.zeros(3, 2, dtype=torch.long))


@torch.no_grad()
def stream_ops_4b() -> None:
    """The 4B shapes of a frame's ops whose tiles depend on the shape: 256 tokens, 16 GDN heads (K 128, V 256),
    16 query / 2 kv heads of 128 over an 8,191-slot ring."""
    from infinitevl.ops import short_conv_fast, swa_fast

    bf16 = torch.bfloat16
    for B in (1, 32):
        fused = torch.empty(B, 256, 2048 + 2048 + 4096 + 4096 + 32, dtype=bf16)
        xs = list(torch.split(fused, [2048, 2048, 4096, 4096 + 32], -1)[:3])
        weights = [torch.empty(C, 4, dtype=bf16) for C in (2048, 2048, 4096)]
        states = [torch.empty(B, C, 3, dtype=bf16) for C in (2048, 2048, 4096)]
        short_conv_fast.short_conv_chunk3(xs, weights, states)
        R = 8191
        swa_fast.block_attention(torch.empty(B, 256, 16, 128, dtype=bf16), torch.empty(B, 256, 2, 128, dtype=bf16),
                                 torch.empty(B, 256, 2, 128, dtype=bf16), torch.zeros(B, 256, dtype=torch.long),
                                 torch.empty(B, R, 2, 128, dtype=bf16), torch.empty(B, R, 2, 128, dtype=bf16),
                                 torch.zeros(B, R, dtype=torch.long), window=8192, scale=128**-0.5)


def train_ops_4b() -> None:
    """The training convs at the 4B shape (they run only on CUDA tensors in the model): the fused projection's
    q/k/v slices of a packed row and of a batch of two, forward and backward."""
    from infinitevl.ops.short_conv_train import seq_starts, short_conv

    for B, cu in ((1, torch.tensor([0, 100, 300], dtype=torch.int32)), (2, None)):
        fused = torch.zeros(B, 300, 2048 + 2048 + 4096 + 4096 + 32, dtype=torch.bfloat16, requires_grad=True)
        xs = list(torch.split(fused, [2048, 2048, 4096, 4096 + 32], -1)[:3])
        weights = [torch.zeros(C, 4, requires_grad=True) for C in (2048, 2048, 4096)]
        starts = seq_starts(cu, 300, "cpu")
        sum(short_conv(x, w, starts_T=starts).float().sum() for x, w in zip(xs, weights)).backward()
    for W in (1, 2, 3):  # narrower kernels (the taps are unrolled by width)
        x = torch.zeros(1, 300, 256, dtype=torch.bfloat16, requires_grad=True)
        short_conv(x, torch.zeros(256, W, requires_grad=True)).float().sum().backward()
    from infinitevl.ops.swiglu_train import swiglu, swiglu_packed

    gu = torch.zeros(300, 2 * 11008, dtype=torch.bfloat16, requires_grad=True)
    swiglu_packed(gu).float().sum().backward()
    gate, up = (torch.zeros(2, 150, 3420, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    swiglu(gate, up).float().sum().backward()
    from infinitevl.ops.rms_norm_train import rms_norm_backward

    s, dy = torch.zeros(300, 2048), torch.zeros(300, 2048, dtype=torch.bfloat16)
    for ds, h_dtype, need_dw in ((torch.zeros(300, 2048), torch.bfloat16, False), (None, None, True)):
        rms_norm_backward(dy, s, torch.ones(2048), torch.ones(300), ds=ds, h_dtype=h_dtype, need_dw=need_dw)


def training(model) -> None:
    from infinitevl.training.losses import cross_entropy_sum

    fast_backend(model)
    model.train()
    cu = torch.tensor([0, 30, 64], dtype=torch.int32)
    ids = text_ids(model, 1, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(ids, cu_seqlens=cu, return_hidden=True)[0]
        loss = cross_entropy_sum(hidden, model.lm_head.weight, ids[0], chunk=32, backend="fla")
    loss.backward()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    args = p.parse_args(argv)
    seen = compile_only(args.arch)
    from infinitevl import InfiniteVL

    tiny = ROOT / "src/infinitevl/assets/tiny-infinitevl"
    for name, run in (("inference (tiny)", lambda: inference(InfiniteVL.from_pretrained(tiny, dtype=torch.bfloat16))),
                      ("stream ops (4B shapes)", stream_ops_4b),
                      ("training ops (4B shapes)", train_ops_4b),
                      ("training (tiny)", lambda: training(InfiniteVL.from_pretrained(tiny)))):
        before = sum(seen.values())
        run()
        print(f"{name}: {sum(seen.values()) - before} launches compiled", flush=True)
    print(f"sm_{args.arch}: {len(seen)} kernels compiled: " + ", ".join(sorted(seen)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
