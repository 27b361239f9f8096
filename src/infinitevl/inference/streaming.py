"""Streaming video sessions: push frames forever in constant memory, ask questions on a branch.

Legend: B streams, N tokens per frame, D model dim.

Token layout (Qwen2.5-VL chat format, one open video block per user turn):

    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<|vision_start|>  frame frame frame ...
    question:  <|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n  -> answer

Each frame is one temporal grid of the block (a still frame repeated over the temporal patch, as
Qwen2.5-VL does for images), and its M-RoPE positions are `block_start + (t, h, w)` with
`t = floor((timestamp - block_t0) * tokens_per_second)`: real time drives the temporal axis.
A question runs on a clone of the state, so the stream's memory is untouched unless `keep=True`,
in which case the question and answer join the stream and a new video block opens after them.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..model.checkpoint import check_tokenizer
from ..model.fingerprint import weights_fingerprint
from ..model.infinitevl import InfiniteVL
from ..model.state import InferenceState
from .frame_step import FrameStep
from .frames import FrameSpec, frames_to_tensor
from .engine import Engine
from .request import answer_stop_ids, whole_number
from .sampling import SamplingParams

SYSTEM_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
QUESTION = "<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
REOPEN = "\n<|im_start|>user\n<|vision_start|>"


@dataclass
class _Clock:
    """Per stream: where the current video block starts (position and time) and the last timestamp."""

    block_start: list[int]
    block_t0: list[float | None]
    last_ts: list[float | None]
    frames: list[int]

    def copy(self) -> "_Clock":
        return _Clock(list(self.block_start), list(self.block_t0), list(self.last_ts), list(self.frames))


@dataclass
class StreamSnapshot:
    state: InferenceState
    clock: _Clock = field(repr=False)
    model: InfiniteVL | None = field(default=None, repr=False, compare=False)  # the session's model when taken


def _clips_to_tensor(clips) -> torch.Tensor:
    """uint8 [B, K, H, W, 3] (tensor or array) or a list of B clips, each anything `frames_to_tensor` takes for K
    frames of one size -> uint8 [B, K, H, W, 3]."""
    if isinstance(clips, (list, tuple)):
        if not clips:
            raise ValueError("no clips given")
        parts = [frames_to_tensor(c) for c in clips]
        if len({tuple(p.shape) for p in parts}) != 1:
            raise ValueError(f"every stream's clip needs the same number and size of frames, got "
                             f"{sorted({tuple(p.shape) for p in parts})}")
        return torch.stack(parts)
    if getattr(clips, "ndim", 0) != 5:
        raise ValueError(f"clips must be uint8 [B, K, H, W, 3] or a list of clips; got {type(clips).__name__} with "
                         f"shape {tuple(getattr(clips, 'shape', ()))}")
    B, K = clips.shape[:2]
    return frames_to_tensor(clips.reshape(B * K, *clips.shape[2:])).view(B, K, *clips.shape[2:])


@torch.no_grad()
def model_identity(model: InfiniteVL) -> str:
    """A fingerprint of the config and of every weight (model/fingerprint.py). A saved stream only loads into the
    same model: a fine-tuned one (SFT, a merged LoRA) differs, and so does the same checkpoint loaded in another
    dtype."""
    return weights_fingerprint(model.named_parameters(remove_duplicate=True),
                               prefix=json.dumps(model.config.to_dict(), sort_keys=True))


# a stream's clock ends here (~31 years): its positions (timestamp x tokens_per_second) stay exact integers
MAX_TIMESTAMP_S = 1e9


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names and bytes, in name order (a saved stream's checksum)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _weights_dtype(model: InfiniteVL) -> str:
    return str(model.lm_head.weight.dtype).removeprefix("torch.")


class StreamSession:
    """`batch_size` independent streams stepped together (one launch per batch of frames)."""

    def __init__(self, model: InfiniteVL, tokenizer, *, frame: FrameSpec = FrameSpec(), batch_size: int = 1,
                 system_prefix: str = SYSTEM_PREFIX, backend: str = "auto", cuda_graph: bool | None = None,
                 capture_sizes: list[tuple[int, int]] | None = None, pipeline: bool | None = None):
        """backend: the decoder's kernels ('auto' = fast on a GPU). cuda_graph (None = on a CUDA device): the
        frame step is captured per input frame size in `capture_sizes` (default: the frame spec's size);
        other sizes run eagerly. pipeline (None = with cuda_graph): a frame's vision tower runs beside the
        previous frame's LLM part (inference/frame_step.py); every read of the state (`state`, `ask`,
        `snapshot`, `save`) first finishes the last frame, so nothing outside sees the difference. The session
        owns the model's backend choice (like the Engine)."""
        if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "image_processor"):  # a processor: its tokenizer
            tokenizer = tokenizer.tokenizer
        if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise ValueError(f"tokenizer must be the model's tokenizer (AutoTokenizer.from_pretrained(model_dir)), "
                             f"got {type(tokenizer).__name__}")
        if not isinstance(frame, FrameSpec):
            raise ValueError(f"frame must be a FrameSpec, e.g. FrameSpec(448, 448) (height, width), got {frame!r:.60}")
        check_tokenizer(tokenizer, model.config, "this StreamSession")
        self.model, self.tokenizer, self.frame = model, tokenizer, frame
        cfg = model.config
        vc = cfg.vision
        if (frame.patch_size, frame.merge_size, frame.temporal_patch_size) != (
                vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size):
            raise ValueError("the frame spec's patch/merge/temporal sizes must equal the model's vision config")
        batch_size = whole_number(batch_size, "batch_size (the number of streams)", 1)
        self.backend = model.set_backend(backend, vision=True)
        if self.backend == "fla":
            model.fuse_projections(vision=True)
        self.tokens_per_second = vc.tokens_per_second
        self.device = model.model.embed_tokens.weight.device
        self._state = model.new_state(batch_size)
        self.clock = _Clock([0] * batch_size, [None] * batch_size, [None] * batch_size, [0] * batch_size)
        prefix = self._encode(system_prefix)
        self._feed_text(prefix.expand(batch_size, -1))
        self.clock.block_start = self._state.next_position.tolist()
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        self.step = FrameStep(model, self._state, frame, cuda_graph=cuda_graph, capture_sizes=capture_sizes,
                              pipeline=cuda_graph if pipeline is None else pipeline)
        self._cuda_graph = cuda_graph
        self._engine: Engine | None = None  # answers questions; made on the first `ask`

    # ---- frames ----
    @property
    def batch_size(self) -> int:
        return self._state.batch_size

    @property
    def state(self) -> InferenceState:
        """The streams' memory with every frame pushed so far in it (a pipelined last frame is finished first).
        The same object each time: a reference held across a later `push_frame` sees that frame only after the
        next read of `state` (or `ask`, `snapshot`, `save`). Reading it every frame runs each frame whole (no
        pipelining); `memory_bytes()` and `clock` need no flush."""
        self.step.flush()
        return self._state

    def push_frame(self, image, timestamp: float) -> None:
        """One frame for a single-stream session."""
        if self.batch_size != 1:
            raise ValueError(f"this session has {self.batch_size} streams: use push_frames with one frame each")
        self.push_frames([image], [timestamp])

    @torch.no_grad()
    def push_frames(self, images, timestamps) -> None:
        """One frame per stream (list of B images, or uint8 [B, H, W, 3]) with B timestamps in seconds. In a
        list, a stream with no frame this step gives None (image and timestamp): its memory stays as it was."""
        B = self.batch_size
        if isinstance(images, (list, tuple)):
            images = list(images)
            absent = [b for b, img in enumerate(images) if img is None]
        else:
            images, absent = frames_to_tensor(images), []
            if images.shape[0] != B:
                raise ValueError(f"give one frame per stream ({B}), got {images.shape[0]} frame(s) "
                                 + ("(push_clip takes several frames of one stream)" if B == 1 else ""))
        if isinstance(timestamps, (np.ndarray, torch.Tensor)) and timestamps.ndim == 1:
            timestamps = timestamps.tolist()
        ts_in = list(timestamps) if isinstance(timestamps, (list, tuple)) else [timestamps]
        if len(images) != B or len(ts_in) != B:
            raise ValueError(f"give exactly one frame and one timestamp per stream ({B}; None and None for a "
                             f"stream without a frame this step); got {len(images)} frames, {len(ts_in)} timestamps")
        if len(absent) == B:
            raise ValueError("no stream has a frame in this step: give at least one")
        for b in absent:
            if ts_in[b] is not None:
                raise ValueError(f"stream {b} has no frame but a timestamp ({ts_in[b]}): give None for both")
        present = [b for b in range(B) if b not in absent]
        frames = frames_to_tensor([images[b] for b in present]) if isinstance(images, list) else images
        if frames.shape[0] != len(present):
            raise ValueError(f"give one frame per stream: {len(present)} stream(s) have frames in this step, which "
                             f"hold {frames.shape[0]} frames (push_clip takes several frames of one stream)")
        if absent:  # stand-in zeros for the streams without a frame
            full = frames.new_zeros(B, *frames.shape[1:])
            full[present] = frames
            frames = full
        if any(isinstance(t, (str, bool)) for t in ts_in):
            raise ValueError(f"timestamps must be numbers of seconds, got {timestamps!r:.80}")
        try:
            # an absent stream's step runs on a stand-in position (its last time) and is then undone
            ts = [(self.clock.last_ts[b] or 0.0) if b in absent else float(t) for b, t in enumerate(ts_in)]
        except (TypeError, ValueError):
            raise ValueError(f"timestamps must be numbers of seconds, got {timestamps!r:.80}") from None
        for b in present:
            self._check_times(b, [ts[b]])
        # Streams without a frame ride along in the one batched step (same captured graph) and get their rows
        # back afterwards: a copy of their state rows, far cheaper than a step of their own (not pipelined:
        # the rows are taken just before and written just after this frame's LLM part).
        kept = self.state.select(absent) if absent else None
        self.step(frames[:, None], self._position_base([[t] for t in ts]), pipeline=not absent)  # clips of one
        for k, b in enumerate(absent):
            self._write_row(b, kept, k)
        for b in present:
            self._advance_clock(b, [ts[b]])

    @torch.no_grad()
    def push_clip(self, frames, timestamps) -> None:
        """K consecutive frames of every stream in one step: uint8 [B, K, H, W, 3] or a list of B clips (each a
        list of K frames or [K, H, W, 3]; a single-stream session also takes its one clip bare), with timestamps
        [B][K] in seconds (single stream: K numbers). The memory afterwards is what K `push_frames` calls give, up
        to float rounding (the clip's K * N tokens run as one chunk); the kernels are fewer and larger, so a
        stream ingests more frames per second, at the latency of K frames. Every stream has all K frames. With
        CUDA graphs each K is captured on its first use (a graph and its buffers per K): keep K fixed, and push the
        rest of a video frame by frame."""
        B = self.batch_size
        if B == 1:  # a single stream's clip may come bare: K frames, K timestamps
            listed = isinstance(frames, (list, tuple))
            one_clip = listed and len(frames) == 1 and (isinstance(frames[0], (list, tuple))
                                                        or getattr(frames[0], "ndim", 0) == 4)
            if getattr(frames, "ndim", 0) == 4 or (listed and not one_clip):
                frames = [frames]
            if isinstance(timestamps, (np.ndarray, torch.Tensor)) and timestamps.ndim == 1:
                timestamps = timestamps.tolist()
            if isinstance(timestamps, (list, tuple)) and not any(
                    isinstance(t, (list, tuple)) or getattr(t, "ndim", 0) >= 1 for t in timestamps):
                timestamps = [timestamps]
        clips = _clips_to_tensor(frames)
        if clips.shape[0] != B:
            raise ValueError(f"give one clip per stream ({B}), got {clips.shape[0]}")
        K = clips.shape[1]
        if K < 1:
            raise ValueError("a clip needs at least one frame")
        if isinstance(timestamps, (np.ndarray, torch.Tensor)):
            timestamps = timestamps.tolist()
        try:
            if isinstance(timestamps, str) or any(isinstance(row, str) for row in timestamps) or any(
                    isinstance(t, (str, bool)) for row in timestamps for t in row):
                raise TypeError
            ts = [[float(t) for t in row] for row in timestamps]
        except (TypeError, ValueError):
            raise ValueError(f"timestamps must be [streams][frames] numbers of seconds, got {timestamps!r:.80}") from None
        if len(ts) != B or any(len(row) != K for row in ts):
            raise ValueError(f"give one timestamp per frame: {B} stream(s) x {K} frames, got "
                             f"{[len(row) for row in ts]}")
        for b in range(B):
            self._check_times(b, ts[b])
        self.step(clips, self._position_base(ts))
        for b in range(B):
            self._advance_clock(b, ts[b])

    def _check_times(self, b: int, ts: list[float]) -> None:
        """Stream b's next frames' timestamps: finite, >= 0, never going back."""
        last = self.clock.last_ts[b]
        for t in ts:
            if not math.isfinite(t) or not 0 <= t <= MAX_TIMESTAMP_S:
                raise ValueError(f"timestamp {t} of stream {b} must be a finite number of seconds in [0, "
                                 f"{MAX_TIMESTAMP_S:.0e}] (seconds from the stream's start)")
            if last is not None and t < last:
                raise ValueError(f"timestamps must not go back: stream {b} got {t} after {last}")
            last = t

    def _advance_clock(self, b: int, ts: list[float]) -> None:
        if self.clock.block_t0[b] is None:
            self.clock.block_t0[b] = ts[0]
        self.clock.last_ts[b] = ts[-1]
        self.clock.frames[b] += len(ts)

    def _position_base(self, ts: list[list[float]]) -> torch.Tensor:
        """[3, B, K] long: M-RoPE (t, h, w) offsets of each stream's next K frames; the step adds the frame grid."""
        base = []
        for b, row in enumerate(ts):
            t0 = row[0] if self.clock.block_t0[b] is None else self.clock.block_t0[b]
            start = self.clock.block_start[b]
            base.append([[start + math.floor((t - t0) * self.tokens_per_second) for t in row], [start] * len(row),
                         [start] * len(row)])
        return torch.tensor(base, dtype=torch.long).permute(1, 0, 2)

    # ---- questions ----
    def ask(self, question: str, *, stream: int = 0, max_new_tokens: int = 64,
            sampling: SamplingParams = SamplingParams(), keep: bool = False) -> str:
        """Answer about everything seen so far on `stream`. The stream's state is unchanged unless `keep`."""
        if question is not None and not isinstance(question, str):
            raise ValueError(f"the question must be a string, got {type(question).__name__}")
        if not question or not question.strip():
            raise ValueError("the question is empty: ask something")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the question is not valid text ({e}): give a proper Unicode string") from None
        if not isinstance(keep, (bool, np.bool_)):
            raise ValueError(f"keep must be True or False, got {keep!r}")
        if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)) or not 0 <= stream < self.batch_size:
            raise ValueError(f"stream {stream!r} does not exist (this session has {self.batch_size}: 0 to "
                             f"{self.batch_size - 1})")
        stream = int(stream)
        # the question is text: chat-format tokens written in it (e.g. <|im_end|>) stay plain text
        head, tail = QUESTION.split("{question}")
        ids = torch.cat([self._encode(head), self._encode(question, text_only=True), self._encode(tail)], dim=1)
        branch = self.state.select([stream])
        stops = answer_stop_ids(self.model, self.tokenizer)
        if self._engine is None:  # the decode step in a CUDA graph on a GPU (eager on CPU), same kernels
            self._engine = Engine(self.model, max_batch_size=1, backend=None, cuda_graph=self._cuda_graph)
        new = self._engine.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling, stop_token_ids=stops,
                                    state=branch)[0]
        tokens = new.tolist()
        if tokens and tokens[-1] in stops:
            tokens = tokens[:-1]
        answer = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if keep:
            # the last answer token is not in the state yet; an answer cut by max_new_tokens gets its turn closed
            last = new[-1:].view(1, 1).to(self.device)
            close = [] if new[-1].item() in stops else [self._encode("<|im_end|>")]
            tail = torch.cat([last, *close, self._encode(REOPEN)], dim=1)
            self.model(tail, state=branch, logits_to_keep=1, placeholders_as_text=True)  # a generated token
            self._write_row(stream, branch)
            self.clock.block_start[stream] = int(branch.next_position[0])
            self.clock.block_t0[stream] = None
        return answer

    def _write_row(self, row: int, src: InferenceState, src_row: int = 0) -> None:
        for dst_t, src_t in zip(self._state.tensors(), src.tensors(), strict=True):
            dst_t[row].copy_(src_t[src_row])

    # ---- memory ----
    def memory_bytes(self) -> int:
        return self._state.nbytes()

    def snapshot(self) -> StreamSnapshot:
        return StreamSnapshot(self.state.clone(), self.clock.copy(), self.model)

    def restore(self, snap: StreamSnapshot) -> None:
        """Back to `snap` (taken from this session, or another one of the same model and number of streams; the
        memory does not depend on the frame size, so a session of another frame size may take it)."""
        if not isinstance(snap, StreamSnapshot):
            raise ValueError(f"restore takes a StreamSnapshot (from snapshot()), got {type(snap).__name__}")
        if snap.model is not None and snap.model is not self.model and \
                model_identity(snap.model) != model_identity(self.model):
            raise ValueError("the snapshot was taken with a different model: restore it into a session of that model")
        mine, theirs = self._state.tensors(), snap.state.tensors()
        if snap.state.batch_size != self.batch_size or len(mine) != len(theirs) or any(
                a.shape != b.shape or a.dtype != b.dtype for a, b in zip(mine, theirs)):
            raise ValueError(f"the snapshot holds {snap.state.batch_size} stream(s) of another state shape than this "
                             f"session ({self.batch_size} stream(s)): restore it into a session like the one it came "
                             "from (same batch size, model and dtype)")
        self.step.discard()  # a pending frame was pushed before the restore: the snapshot replaces it
        self._state.copy_(snap.state)  # in place: buffers keep their addresses
        self.clock = snap.clock.copy()

    def save(self, path: str | Path) -> None:
        """The whole memory (safetensors), with the model identity and the stream clock."""
        tensors = {f"state.{i:04d}": t.detach().cpu().contiguous() for i, t in enumerate(self.state.tensors())}
        meta = {"identity": model_identity(self.model), "frame": json.dumps(asdict(self.frame)),
                "clock": json.dumps(asdict(self.clock)), "batch_size": str(self.batch_size),
                "dtype": _weights_dtype(self.model), "format": "infinitevl-stream-1",
                "sha256": _digest(tensors)}
        path = Path(path).expanduser()
        if path.is_dir():
            raise ValueError(f"{path} is a directory: give a file name, e.g. {path / 'stream.safetensors'}")
        if not path.parent.is_dir():
            what = "is a file" if path.parent.exists() else "does not exist (create it first)"
            raise ValueError(f"cannot save to {path}: the folder {path.parent} {what}")
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            tmp.replace(path)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"cannot save the stream memory to {path} ({e})") from e

    def load(self, path: str | Path) -> None:
        """Restore a saved memory. Everything is checked before anything changes: the model it was saved from,
        the number of streams, the tensors' names and shapes, the checksum and the clock; a file that fails any
        check is refused (ValueError) and the session keeps its memory. Like `restore`, a session of another
        frame size may load it (the memory does not depend on the frame size)."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise ValueError(f"{path} is a directory: give the file save() wrote")
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read stream memory {path}: {e}") from e
        if meta.get("format") != "infinitevl-stream-1":
            raise ValueError(f"{path} is not a saved InfiniteVL stream")
        if meta.get("identity") != model_identity(self.model):
            saved, now = meta.get("dtype"), _weights_dtype(self.model)
            why = (f"it was saved with {saved} weights and this model has {now}: load the model in {saved}, or"
                   if saved and saved != now else "config or weights differ:")
            raise ValueError(f"{path} was saved from a different model ({why} load it into the model it came from)")
        damaged = f"{path} is damaged or was not written by StreamSession.save"
        try:
            batch = int(meta["batch_size"])
            clock = _Clock(**json.loads(meta["clock"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{damaged} (its metadata: {type(e).__name__}: {e})") from None
        if batch != self.batch_size:
            raise ValueError(f"{path} holds {batch} stream(s) and this session has {self.batch_size}: load it into a "
                             f"session with batch_size={batch}")
        fields = (clock.block_start, clock.block_t0, clock.last_ts, clock.frames)
        if any(not isinstance(f, list) or len(f) != batch for f in fields):
            raise ValueError(f"{damaged} (its clock does not describe {batch} stream(s))")

        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        def time_or_none(v) -> bool:
            return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                 and 0 <= v <= MAX_TIMESTAMP_S)

        if not (all(map(count, clock.block_start + clock.frames))
                and all(map(time_or_none, clock.block_t0 + clock.last_ts))):
            raise ValueError(f"{damaged} (its clock holds values no stream can have)")
        mine = self._state.tensors()
        names = [f"state.{i:04d}" for i in range(len(mine))]
        if sorted(tensors) != names or any(tensors[n].shape != t.shape or tensors[n].dtype != t.dtype
                                           for n, t in zip(names, mine)):
            raise ValueError(f"{path} holds a state of another shape than this session's: load it into a session of "
                             "the model and batch size it was saved from")
        if "sha256" in meta and meta["sha256"] != _digest({n: tensors[n] for n in names}):
            raise ValueError(f"{damaged} (its checksum does not match its contents): the file was changed or "
                             "corrupted; load an intact copy")
        if not all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point()):
            raise ValueError(f"{damaged} (it holds NaN or infinite values)")
        self.step.discard()  # the loaded memory replaces everything pushed before
        for n, t in zip(names, mine):
            t.copy_(tensors[n])
        self.clock = clock

    # ---- helpers ----
    def _encode(self, text: str, *, text_only: bool = False) -> torch.Tensor:
        """Token ids [1, T] on the device; text_only: special-token strings in `text` are plain text."""
        kw = {"split_special_tokens": True} if text_only else {}
        try:
            ids = self.tokenizer(text, add_special_tokens=False, **kw)["input_ids"]
        except TypeError:  # a tokenizer without the option (e.g. a byte-level test tokenizer) reads text as text
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def _feed_text(self, ids_BT: torch.Tensor) -> None:
        with torch.no_grad():
            self.model(ids_BT, state=self._state, logits_to_keep=1)
