"""Images and videos -> the vision tower's inputs, for training data.

Legend: N patches, P = C * temporal_patch * patch^2, F frames.

Images go through transformers' `Qwen2VLImageProcessorPil` (resize to multiples of 28 within the
pixel budget, CLIP normalisation, merge-group patch order). A video is sampled at `video_fps`
(an even number of frames, as Qwen2.5-VL wants), each frame goes through the same processor at
the video pixel budget, and consecutive frame pairs fill the two temporal slots of a patch — the
layout of Qwen2-VL's video processor. How many tokens a medium gives is computable from its
header alone (`*_grid`), so packing can be planned without decoding anything.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass
class VisionInputConfig:
    image_min_pixels: int = 56 * 56  # images are resized to keep their pixel count in [min, max]
    image_max_pixels: int = 1806336  # the published stage configs' image_max_pixels
    video_min_pixels: int = 56 * 56  # per frame
    video_max_pixels: int = 16384  # the published video_max_pixels
    video_fps: float = 2.0  # frames sampled per second of video
    video_max_frames: int = 128  # at most this many frames per video (sampled evenly)
    patch_size: int | None = None  # the vision tower's patch (null: the model's; another value is an error)
    merge_size: int | None = None  # patches merged per side into one token (null: the model's spatial_merge_size)
    temporal_patch_size: int | None = None  # video frames per patch in time (null: the model's)

    def __post_init__(self):
        for name in ("image_min_pixels", "image_max_pixels", "video_min_pixels", "video_max_pixels",
                     "video_max_frames", "patch_size", "merge_size", "temporal_patch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"data.vision.{name} must be >= 1, got {getattr(self, name)}")
        if not self.video_fps > 0:
            raise ValueError(f"data.vision.video_fps must be > 0, got {self.video_fps}")
        for kind in ("image", "video"):
            lo, hi = getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")
            if lo > hi:
                raise ValueError(f"data.vision.{kind}_min_pixels ({lo}) is above {kind}_max_pixels ({hi})")


class MediaError(ValueError):
    """A medium cannot be read: missing, corrupt or unsupported file."""


QWEN_PATCHES = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}  # Qwen2.5-VL's vision tower


class VisionInputs:
    def __init__(self, cfg: VisionInputConfig = VisionInputConfig()):
        """Patch sizes left as None (the model's: `data.chat_format_for` fills them in) are Qwen2.5-VL's."""
        from transformers import Qwen2VLImageProcessorPil

        cfg = dataclasses.replace(cfg, **{k: v for k, v in QWEN_PATCHES.items() if getattr(cfg, k) is None})
        self.cfg = cfg
        common = dict(patch_size=cfg.patch_size, merge_size=cfg.merge_size, temporal_patch_size=cfg.temporal_patch_size)
        self._image = Qwen2VLImageProcessorPil(min_pixels=cfg.image_min_pixels, max_pixels=cfg.image_max_pixels, **common)
        self._frame = Qwen2VLImageProcessorPil(min_pixels=cfg.video_min_pixels, max_pixels=cfg.video_max_pixels, **common)

    # ---- sizes (no decoding) ----
    def _grid_hw(self, width: int, height: int, lo: int, hi: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        unit = self.cfg.patch_size * self.cfg.merge_size
        h, w = smart_resize(height, width, factor=unit, min_pixels=lo, max_pixels=hi)
        return h // self.cfg.patch_size, w // self.cfg.patch_size

    def image_grid(self, width: int, height: int) -> tuple[int, int, int]:
        return (1, *self._grid_hw(width, height, self.cfg.image_min_pixels, self.cfg.image_max_pixels))

    def video_grid(self, width: int, height: int, n_frames: int) -> tuple[int, int, int]:
        assert n_frames % self.cfg.temporal_patch_size == 0
        hw = self._grid_hw(width, height, self.cfg.video_min_pixels, self.cfg.video_max_pixels)
        return (n_frames // self.cfg.temporal_patch_size, *hw)

    def tokens(self, grid: tuple[int, int, int]) -> int:
        return grid[0] * grid[1] * grid[2] // self.cfg.merge_size**2

    def frame_plan(self, total_frames: int, native_fps: float) -> tuple[list[int], float]:
        """Which frames to keep (indices into the decoded stream) and the resulting frames per second."""
        tp = self.cfg.temporal_patch_size
        if total_frames < 1:
            raise MediaError("the video has no frames")
        duration = total_frames / native_fps
        n = round(duration * self.cfg.video_fps / tp) * tp
        n = max(tp, min(n, self.cfg.video_max_frames - self.cfg.video_max_frames % tp))
        idx = np.linspace(0, total_frames - 1, n).round().astype(int).tolist()
        return idx, n / duration

    # ---- pixels ----
    def image(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [N, P], grid_thw [3])"""
        out = self._image(images=[img.convert("RGB")], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"][0]

    def video(self, frames: list[Image.Image], sample_fps: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(pixel_values [N, P], grid_thw [3], seconds per temporal patch) for frames sampled at `sample_fps`."""
        tp, ps, m = self.cfg.temporal_patch_size, self.cfg.patch_size, self.cfg.merge_size
        if len(frames) % tp:
            frames = frames + [frames[-1]] * (tp - len(frames) % tp)
        out = self._frame(images=[f.convert("RGB") for f in frames], return_tensors="pt")
        grids = out["image_grid_thw"]
        if not bool((grids == grids[0]).all()):
            raise MediaError("video frames differ in size: all frames of a video must have one size")
        _, gh, gw = grids[0].tolist()
        # Each frame's patches hold the frame twice (tp slots); take slot 0 of each frame of a pair.
        px = out["pixel_values"].view(len(frames), gh * gw, 3, tp, ps * ps)[:, :, :, 0]  # [F, N, C, ps*ps]
        px = px.view(len(frames) // tp, tp, gh * gw, 3, ps * ps).permute(0, 2, 3, 1, 4)  # [F/tp, N, C, tp, ps*ps]
        pixels = px.reshape(len(frames) // tp * gh * gw, 3 * tp * ps * ps).contiguous()
        grid = torch.tensor([len(frames) // tp, gh, gw])
        return pixels, grid, tp / sample_fps


# ---- reading files ----


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header; raises MediaError if the file is missing or not an image."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError as e:
        raise MediaError(f"image file not found: {path}") from e
    except (OSError, Image.DecompressionBombError) as e:
        raise MediaError(f"cannot read image {path}: {e}") from e


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise MediaError(f"image file not found: {path}") from e
    except (OSError, Image.DecompressionBombError) as e:
        raise MediaError(f"cannot decode image {path} (corrupt or truncated?): {e}") from e


@dataclass
class VideoInfo:
    width: int
    height: int
    frames: int
    fps: float


def probe_video(path: Path | list[Path], frames_fps: float) -> VideoInfo:
    """Header facts of a video file, or of a list of frame images (taken at `frames_fps`)."""
    if isinstance(path, list):
        if not path:
            raise MediaError("a video given as a list of frames needs at least one frame")
        sizes = [image_size(p) for p in path]  # headers only: a missing or odd frame is found while measuring
        odd = next((p for p, s in zip(path, sizes) if s != sizes[0]), None)
        if odd is not None:
            raise MediaError(f"the frames of one video must all have one size: {path[0]} is "
                             f"{sizes[0][0]}x{sizes[0][1]}, {odd} is {image_size(odd)[0]}x{image_size(odd)[1]}")
        w, h = sizes[0]
        return VideoInfo(w, h, len(path), frames_fps)
    import av

    if not Path(path).exists():
        raise MediaError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            n = s.frames
            fps = float(s.average_rate or s.guessed_rate or 0)
            if n <= 0:  # some containers do not store a frame count: count packets
                n = sum(1 for p in c.demux(s) if p.size)
            w, h = s.codec_context.width, s.codec_context.height
    except (av.FFmpegError, IndexError, OSError) as e:
        raise MediaError(f"cannot read video {path}: {e}") from e
    if n <= 0 or fps <= 0 or w <= 0 or h <= 0:
        raise MediaError(f"video {path} has no usable video stream (frames={n}, fps={fps}, size={w}x{h})")
    return VideoInfo(w, h, n, fps)


def load_frames(path: Path | list[Path], indices: list[int]) -> list[Image.Image]:
    if isinstance(path, list):
        return [load_image(path[i]) for i in indices]
    import av

    want = set(indices)
    got: dict[int, Image.Image] = {}
    try:
        with av.open(str(path)) as c:
            for i, frame in enumerate(c.decode(video=0)):
                if i in want:
                    got[i] = frame.to_image().convert("RGB")
                if i >= max(indices):
                    break
    except (av.FFmpegError, OSError) as e:
        raise MediaError(f"cannot decode video {path} (corrupt or truncated?): {e}") from e
    missing = [i for i in indices if i not in got]
    if missing:
        # The header over-counted frames: repeat the last decoded one rather than shift every label.
        if not got:
            raise MediaError(f"video {path} decoded to no frames")
        last = got[max(got)]
        for i in missing:
            got[i] = last
    return [got[i] for i in indices]

