"""The per-frame step of a stream: frame pixels -> vision encoder -> merger -> LLM prefill of the frame's
tokens into the state. One function with static shapes and no host syncs, captured in a CUDA graph per
(batch, input height, input width); eager on CPU, for frame sizes not captured, or with cuda_graph=False.

Legend: B streams, H/W input pixels, N tokens per frame, D model dim.

The step reads two static inputs, written before each replay: the frames (uint8 [B, H, W, 3]) and each
row's position base (long [3, B]: block start + temporal offset, block start, block start; the host knows
the clock, so no position is ever read back from the device). Everything else (patch order, rotary tables,
the frame grid's M-RoPE offsets, CLIP stats) is made once. A replay advances every layer's state in place:
the SWA ring buffer and its token indices, the GDN conv tails and recurrent state, `seen` and
`next_position`; nothing is frozen at capture time (the published demo's attention stopped updating).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..model.infinitevl import InfiniteVL
from ..model.state import InferenceState
from ..ops.backend import log
from .cuda_graph import CapturedStep
from .frames import FrameSpec, clip_stats, preprocess_frames


@dataclass
class _Graph:
    frames: torch.Tensor  # [B, H, W, 3] uint8, device
    base: torch.Tensor  # [3, B] long, device
    step: CapturedStep
    # pinned host copies, two of each, so a copy can be queued while the previous one is in flight
    pinned: list = field(default_factory=list)
    turn: int = 0


class FrameStep:
    def __init__(self, model: InfiniteVL, state: InferenceState, spec: FrameSpec, *, cuda_graph: bool,
                 capture_sizes: Iterable[tuple[int, int]] | None = None):
        """capture_sizes: input frame sizes (height, width) to capture; default the spec's own size (what
        `VideoSource` delivers). Frames of other sizes are resized inside the step and run eagerly."""
        self.model, self.state, self.spec = model, state, spec
        self.device = model.model.embed_tokens.weight.device
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device (it is on {self.device})")
        self.cuda_graph = cuda_graph
        sizes = [(spec.height, spec.width)] if capture_sizes is None else list(capture_sizes)
        self.capture_sizes = {(int(h), int(w)) for h, w in sizes}
        self.pixel_dtype = model.visual.patch_embed.proj.weight.dtype
        _, gh, gw = spec.grid_thw
        self.layout = model.visual.frame_layout(gh, gw, self.device)
        self.stats = clip_stats(self.device)
        m = spec.merge_size
        hh = torch.arange(gh // m).repeat_interleave(gw // m)
        ww = torch.arange(gw // m).repeat(gh // m)
        self.grid_3N = torch.stack([torch.zeros_like(hh), hh, ww]).to(self.device)
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        self._pool = None
        self._warned: set[tuple[int, int, int]] = set()

    @torch.no_grad()
    def run(self, frames_BHWC: torch.Tensor, base_3B: torch.Tensor) -> None:
        """The step itself (what a graph records): device tensors in, `state` advanced in place."""
        model, state = self.model, self.state
        B, N = frames_BHWC.shape[0], self.spec.tokens_per_frame
        pixels = preprocess_frames(frames_BHWC, self.spec, dtype=self.pixel_dtype, stats=self.stats)
        feats = model.visual.forward_frames(pixels, self.layout)
        x_BND = feats.view(B, N, -1).to(model.model.embed_tokens.weight.dtype)
        pos_3BN = base_3B[:, :, None] + self.grid_3N[:, None, :]
        model.model(x_BND, pos_3BN, state=state)
        state.seen.add_(N)
        state.next_position.copy_(pos_3BN.amax(0).amax(-1) + 1)

    def __call__(self, frames_BHWC: torch.Tensor, base_3B: torch.Tensor) -> None:
        """frames uint8 [B, H, W, 3] and position bases long [3, B], on the host or the device."""
        B, H, W, _ = frames_BHWC.shape
        key = (B, H, W)
        if self.cuda_graph and (H, W) in self.capture_sizes:
            graph = self.graphs.get(key) or self._capture(key)
            self._upload(graph, frames_BHWC, base_3B)
            graph.step()
            return
        if self.cuda_graph and key not in self._warned:
            self._warned.add(key)
            log.warning("frames of %dx%d (batch %d) run eagerly: captured sizes are %s; pass capture_sizes to "
                        "capture this one too", H, W, B, sorted(self.capture_sizes))
        self.run(frames_BHWC.to(self.device), base_3B.to(self.device))

    def _capture(self, key: tuple[int, int, int]) -> _Graph:
        B, H, W = key
        if B != self.state.batch_size:
            raise ValueError(f"{B} frames for a state of {self.state.batch_size} streams")
        frames = torch.zeros(B, H, W, 3, dtype=torch.uint8, device=self.device)
        base = torch.zeros(3, B, dtype=torch.long, device=self.device)
        # warm-up inside CapturedStep really runs the step: keep the state as it was
        saved = self.state.clone()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        step = CapturedStep(lambda: self.run(frames, base), pool=self._pool)
        self.state.copy_(saved)
        del saved
        pinned = [(torch.empty_like(frames, device="cpu").pin_memory(), torch.empty_like(base, device="cpu").pin_memory(),
                   torch.cuda.Event()) for _ in range(2)]
        graph = _Graph(frames=frames, base=base, step=step, pinned=pinned)
        self.graphs[key] = graph
        log.info("captured the frame step for %d stream(s) of %dx%d frames", B, H, W)
        return graph

    @staticmethod
    def _upload(graph: _Graph, frames_BHWC: torch.Tensor, base_3B: torch.Tensor) -> None:
        """Host inputs go through pinned buffers (an async copy that never waits for the GPU to drain)."""
        frames_pin, base_pin, done = graph.pinned[graph.turn]
        graph.turn ^= 1
        done.synchronize()  # the copy issued from this buffer two frames ago has finished
        for dst, src, pin in ((graph.frames, frames_BHWC, frames_pin), (graph.base, base_3B, base_pin)):
            if src.device.type == "cuda":
                dst.copy_(src)
            else:
                pin.copy_(src)
                dst.copy_(pin, non_blocking=True)
        done.record()
