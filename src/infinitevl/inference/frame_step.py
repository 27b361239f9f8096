"""The per-frame step of a stream: frame pixels -> vision encoder -> merger -> LLM prefill of the frame's
tokens into the state. One function with static shapes and no host syncs, captured in a CUDA graph per
(batch, frames per stream, input height, input width); eager on CPU, for frame sizes not captured, or with
cuda_graph=False.

Legend: B streams, K consecutive frames per stream in one step (a clip; 1 = a frame), H/W input pixels,
N tokens per frame, D model dim.

The step reads two static inputs, written before each replay: the frames (uint8 [B, H, W, 3], or a clip
[B, K, H, W, 3]) and each frame's position base (long [3, B] or [3, B, K]: block start + temporal offset, block
start, block start; the host knows
the clock, so no position is ever read back from the device). Everything else (patch order, rotary tables,
the frame grid's M-RoPE offsets, CLIP stats) is made once. A replay advances every layer's state in place:
the SWA ring buffer and its token indices, the GDN conv tails and recurrent state, `seen` and
`next_position`; nothing is frozen at capture time (the published demo's attention stopped updating).

A clip runs its K frames through the vision tower as one batch and their K * N tokens through the LLM as one
chunk: the state K single-frame steps give (up to float rounding), with fewer, larger kernels.

Pipelined (`pipeline=True`): a call runs the vision tower of its frame beside the LLM part of the previous
frame (two CUDA streams in one graph) and leaves its own LLM part pending; `flush()` runs it. The state then
holds every frame but the last one pushed until something flushes (`StreamSession` does before any read of
the state). Same kernels, same order of state updates: the state after a flush is the sequential one.
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
    frames: torch.Tensor  # [B, K, H, W, 3] uint8, device
    base: torch.Tensor  # [3, B, K] long, device
    step: CapturedStep  # the whole step: vision, then LLM
    # pinned host copies, two of each, so a copy can be queued while the previous one is in flight
    pinned: list = field(default_factory=list)
    turn: int = 0
    # pipelined: the pending frame's merger features and position bases, and the three graphs over them
    feats: torch.Tensor | None = None  # [B, K * N, D]
    base_llm: torch.Tensor | None = None  # like base
    prime: CapturedStep | None = None  # vision of `frames` -> feats (nothing pending before)
    both: CapturedStep | None = None  # LLM of feats beside the vision of `frames`, then the new frame pending
    drain: CapturedStep | None = None  # LLM of feats


class FrameStep:
    def __init__(self, model: InfiniteVL, state: InferenceState, spec: FrameSpec, *, cuda_graph: bool,
                 capture_sizes: Iterable[tuple[int, int]] | None = None, pipeline: bool = False):
        """capture_sizes: input frame sizes (height, width) to capture; default the spec's own size (what
        `VideoSource` delivers). Frames of other sizes are resized inside the step and run eagerly.
        pipeline: each frame's LLM part runs with the next frame's vision tower (see the module doc)."""
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
        self.graphs: dict[tuple[int, int, int, int], _Graph] = {}  # (B, K, H, W)
        self._pool = None
        self._warned: set[tuple[int, int, int, int]] = set()
        self.pipeline = pipeline
        self._pending = None  # pipelined: the graph whose feats wait for their LLM part, or (feats, base) eager
        self._side = torch.cuda.Stream(self.device) if cuda_graph and pipeline else None

    def vision(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, H, W, 3] or clips [B, K, H, W, 3] -> the merger's features [B, K * N, D] in the LLM's
        dtype (a clip's frames in order)."""
        B, N = frames.shape[0], self.spec.tokens_per_frame
        pixels = preprocess_frames(frames.reshape(-1, *frames.shape[-3:]), self.spec, dtype=self.pixel_dtype,
                                   stats=self.stats)
        feats = self.model.visual.forward_frames(pixels, self.layout)
        return feats.view(B, -1, feats.shape[-1]).to(self.model.model.embed_tokens.weight.dtype)

    def llm(self, x_BND: torch.Tensor, base: torch.Tensor) -> None:
        """Frames' tokens [B, K * N, D] into the state (advanced in place); base [3, B] or [3, B, K]."""
        state, T = self.state, x_BND.shape[1]
        base_3BK = base if base.ndim == 3 else base[:, :, None]
        B = base_3BK.shape[1]
        pos_3BN = (base_3BK[:, :, :, None] + self.grid_3N[:, None, None, :]).reshape(3, B, T)
        self.model.model(x_BND, pos_3BN, state=state)
        state.seen.add_(T)
        state.next_position.copy_(pos_3BN.amax(0).amax(-1) + 1)

    @torch.no_grad()
    def run(self, frames: torch.Tensor, base: torch.Tensor) -> None:
        """The step itself (what a graph records): device tensors in, `state` advanced in place."""
        self.llm(self.vision(frames), base)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, base: torch.Tensor, *, pipeline: bool = True) -> None:
        """frames uint8 [B, H, W, 3] with position bases long [3, B], or clips [B, K, H, W, 3] with [3, B, K], on
        the host or the device. pipeline=False runs this step whole (after flushing a pending one) even in a
        pipelined step."""
        if frames.ndim == 4 and base.ndim == 2:  # a frame per stream: a clip of one
            frames, base = frames[:, None], base[:, :, None]
        if frames.ndim != 5 or frames.shape[-1] != 3 or tuple(base.shape) != (3, *frames.shape[:2]):
            raise ValueError(f"frames [B, H, W, 3] with bases [3, B], or clips [B, K, H, W, 3] with [3, B, K]; got "
                             f"{tuple(frames.shape)} and {tuple(base.shape)}")
        B, K, H, W = frames.shape[:4]
        key = (B, K, H, W)
        pipelined = self.pipeline and pipeline
        graph = None
        if self.cuda_graph and (H, W) in self.capture_sizes:
            graph = self.graphs.get(key)
            if graph is None:
                self.flush()  # a capture runs the step for real on a saved and restored state
                graph = self._capture(key)
        elif self.cuda_graph and key not in self._warned:
            self._warned.add(key)
            log.warning("frames of %dx%d (%d stream(s), %d a step) run eagerly: captured sizes are %s; pass "
                        "capture_sizes to capture this one too", H, W, B, K, sorted(self.capture_sizes))
        if pipelined and graph is not None and self._pending is graph:
            self._upload(graph, frames, base)
            graph.both()  # the pending frame's LLM part beside this frame's vision; this frame now pending
            return
        self.flush()
        if graph is not None:
            self._upload(graph, frames, base)
            if pipelined:
                graph.prime()
                self._pending = graph
            else:
                graph.step()
        elif pipelined:  # (a copy of the bases: the caller may reuse its tensor before the LLM part runs)
            self._pending = (self.vision(frames.to(self.device)), base.to(self.device).clone())
        else:
            self.run(frames.to(self.device), base.to(self.device))

    @torch.no_grad()
    def flush(self) -> None:
        """Runs the pending frame's LLM part (pipelined), so the state holds every frame pushed."""
        pending, self._pending = self._pending, None
        if isinstance(pending, _Graph):
            pending.drain()
        elif pending is not None:
            self.llm(*pending)

    def discard(self) -> None:
        """Drops a pending frame unprocessed (its state is about to be overwritten anyway)."""
        self._pending = None

    def _capture(self, key: tuple[int, int, int, int]) -> _Graph:
        B, K, H, W = key
        if B != self.state.batch_size:
            raise ValueError(f"{B} frames for a state of {self.state.batch_size} streams")
        frames = torch.zeros(B, K, H, W, 3, dtype=torch.uint8, device=self.device)
        base = torch.zeros(3, B, K, dtype=torch.long, device=self.device)
        # warm-up inside CapturedStep really runs the step: keep the state as it was
        saved = self.state.clone()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            step = CapturedStep(lambda: self.run(frames, base), pool=self._pool)
            graph = _Graph(frames=frames, base=base, step=step)
            if self.pipeline:
                self._capture_pipelined(graph)
        finally:  # also when a capture fails (out of memory): the warm-ups' frames leave the state
            self.state.copy_(saved)
            del saved
        graph.pinned = [(torch.empty_like(frames, device="cpu").pin_memory(),
                         torch.empty_like(base, device="cpu").pin_memory(), torch.cuda.Event()) for _ in range(2)]
        self.graphs[key] = graph
        log.info("captured the frame step for %d stream(s) of %s%dx%d frames%s", B, f"{K}-frame clips of " if K > 1 else "",
                 H, W, " (pipelined)" if self.pipeline else "")
        return graph

    def _capture_pipelined(self, g: _Graph) -> None:
        """The three graphs of a pipelined step over the pending frame's static buffers."""
        B, N = g.frames.shape[0], self.spec.tokens_per_frame * g.frames.shape[1]
        D = self.model.config.text.hidden_size
        g.feats = torch.zeros(B, N, D, dtype=self.model.model.embed_tokens.weight.dtype, device=self.device)
        g.base_llm = torch.zeros_like(g.base)
        side = self._side

        def prime():
            g.feats.copy_(self.vision(g.frames))
            g.base_llm.copy_(g.base)

        def both():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                new = self.vision(g.frames)
            self.llm(g.feats, g.base_llm)
            torch.cuda.current_stream().wait_stream(side)
            g.feats.copy_(new)
            g.base_llm.copy_(g.base)

        g.prime = CapturedStep(prime, pool=self._pool)
        g.both = CapturedStep(both, pool=self._pool)
        g.drain = CapturedStep(lambda: self.llm(g.feats, g.base_llm), pool=self._pool)

    @staticmethod
    def _upload(graph: _Graph, frames: torch.Tensor, base: torch.Tensor) -> None:
        """Host inputs go through pinned buffers (an async copy that never waits for the GPU to drain)."""
        frames_pin, base_pin, done = graph.pinned[graph.turn]
        graph.turn ^= 1
        done.synchronize()  # the copy issued from this buffer two frames ago has finished
        for dst, src, pin in ((graph.frames, frames, frames_pin), (graph.base, base, base_pin)):
            if src.device.type == "cuda":
                dst.copy_(src)
            else:
                pin.copy_(src)
                dst.copy_(pin, non_blocking=True)
        done.record()
