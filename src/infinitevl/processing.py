"""Processor support: `AutoProcessor.from_pretrained(released_dir)` without torchvision.

Legend: T frames, C channels, H height, W width, N patches, P = C * temporal_patch * patch^2.

A released InfiniteVL directory names `Qwen2_5_VLProcessor` (tokenizer + image processor + video processor).
transformers' Qwen2-VL *video* processor is built on torchvision, so without torchvision (our CPU install)
loading the processor fails. When, and only when, torchvision is missing, `register_video_processor` registers
`Qwen2VLVideoProcessor` below (numpy + PIL, same name, same outputs) with `AutoVideoProcessor`, whose name
lookup then finds it. With torchvision installed nothing is registered and transformers' own classes are used.

The video layout matches the image processor's: frames resized with PIL bicubic to multiples of
patch * merge (28) within [min_pixels, max_pixels], rescaled and normalised with the configured mean/std,
grouped by `temporal_patch_size` (the last frame repeated to fill a group), and patchified in merge-group
order. It also returns the metadata `Qwen2_5_VLProcessor` turns into `second_per_grid_ts`
(= temporal_patch_size / fps of the frames); `fps` is the rate of the given frames: from `video_metadata`,
else the `fps` argument, else 2.0 (qwen_vl_utils' sampling rate). Video paths are decoded with PyAV.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .media import DEFAULT_FPS, MediaError, load_image, load_video, smart_resize

log = logging.getLogger("infinitevl")

_RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
             3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}
# Keys of a preprocessor_config.json that describe the image processor or the file, not the video processing.
_NOT_OURS = {"image_processor_type", "video_processor_type", "processor_class", "feature_extractor_type", "auto_map",
             "_processor_class", "do_pad", "do_center_crop", "crop_size", "input_data_format", "data_format",
             "device", "return_tensors", "default_to_square", "num_frames", "do_sample_frames", "min_frames",
             "max_frames", "cap_pixels_per_frame", "max_video_tokens", "video_metadata", "return_metadata"}


def torchvision_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401  (a CUDA-only wheel on a CPU machine is installed but fails to import)
    except Exception:
        return False
    return True


def _video_processor_base():
    try:
        from transformers.video_processing_utils import VideoProcessorMixin
    except ImportError:  # transformers older than the torchvision-free mixin
        return None
    return VideoProcessorMixin


_Base = _video_processor_base() or object


class Qwen2VLVideoProcessor(_Base):  # the name transformers looks up for Qwen2-VL-family checkpoints
    """Qwen2-VL video processor without torchvision (numpy + PIL). See the module docstring."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, **kwargs: Any):
        super().__init__()
        size = dict(kwargs.pop("size", None) or {})
        min_pixels = kwargs.pop("min_pixels", None) or size.get("shortest_edge") or size.get("min_pixels") or 128 * 28 * 28
        max_pixels = kwargs.pop("max_pixels", None) or size.get("longest_edge") or size.get("max_pixels") or 768 * 28 * 28
        self.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
        self.patch_size = int(kwargs.pop("patch_size", 14))
        self.temporal_patch_size = int(kwargs.pop("temporal_patch_size", 2))
        self.merge_size = int(kwargs.pop("merge_size", 2))
        self.image_mean = list(kwargs.pop("image_mean", [0.48145466, 0.4578275, 0.40821073]))
        self.image_std = list(kwargs.pop("image_std", [0.26862954, 0.26130258, 0.27577711]))
        self.rescale_factor = float(kwargs.pop("rescale_factor", 1 / 255))
        self.resample = int(kwargs.pop("resample", 3))
        self.do_resize = bool(kwargs.pop("do_resize", True))
        self.do_rescale = bool(kwargs.pop("do_rescale", True))
        self.do_normalize = bool(kwargs.pop("do_normalize", True))
        self.do_convert_rgb = bool(kwargs.pop("do_convert_rgb", True))
        self.fps = kwargs.pop("fps", None)
        unknown = sorted(k for k in kwargs if k not in _NOT_OURS)
        if unknown:
            log.warning("Qwen2VLVideoProcessor (torchvision-free): ignoring unknown setting(s) %s", unknown)
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be a PIL resampling code 0..5, got {self.resample}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (RGB)")

    # ---- the processor protocol ----
    def __call__(self, videos: Any, **kwargs: Any):
        return self.preprocess(videos, **kwargs)

    def preprocess(
        self,
        videos: Any,
        *,
        fps: float | list[float] | None = None,
        video_metadata: Any = None,
        return_tensors: str | None = None,
        return_metadata: bool = False,
        do_sample_frames: bool | None = None,
        size: dict | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **ignored: Any,
    ):
        """pixel_values_videos [N, P] float32, video_grid_thw [n_videos, 3] (and video_metadata)."""
        from transformers.feature_extraction_utils import BatchFeature
        from transformers.video_utils import VideoMetadata

        lo = int(min_pixels or (size or {}).get("shortest_edge") or self.size["shortest_edge"])
        hi = int(max_pixels or (size or {}).get("longest_edge") or self.size["longest_edge"])
        batch = _as_video_list(videos)
        if do_sample_frames and not all(isinstance(v, (str, Path)) for v in batch):
            # video paths are sampled at `fps` while decoding; given frames are taken as they are
            raise ValueError("do_sample_frames=True needs video paths with the torchvision-free video processor: "
                             "sample the frames yourself (infinitevl.media.load_video(path, fps=...)) or pass paths")
        rates = _rates(len(batch), fps if fps is not None else self.fps)
        metas = _metadata_list(video_metadata, len(batch))

        patches, grids, out_meta = [], [], []
        for i, video in enumerate(batch):
            if isinstance(video, (str, Path)):
                frames_THWC, rate = load_video(video, fps=rates[i] or DEFAULT_FPS)
            else:
                frames_THWC, rate = _frames_array(video, i), rates[i]
            if metas[i] is not None:
                meta = metas[i] if isinstance(metas[i], VideoMetadata) else VideoMetadata(**metas[i])
                rate = meta.sampled_fps if meta.fps is not None else rate
            rate = float(rate or DEFAULT_FPS)
            pixels_TCHW = self._pixels(frames_THWC, lo, hi)
            p, grid = patchify_video(pixels_TCHW, patch_size=self.patch_size, merge_size=self.merge_size,
                                     temporal_patch_size=self.temporal_patch_size)
            patches.append(p)
            grids.append(grid)
            out_meta.append(VideoMetadata(total_num_frames=len(frames_THWC), fps=rate, height=pixels_TCHW.shape[2],
                                          width=pixels_TCHW.shape[3]))
        data = {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.array(grids, dtype=np.int64)}
        out = BatchFeature(data, tensor_type=return_tensors)
        if return_metadata:
            out["video_metadata"] = out_meta
        return out

    def _pixels(self, frames_THWC: np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
        T, H, W, _ = frames_THWC.shape
        if self.do_resize:
            h, w = smart_resize(H, W, factor=self.patch_size * self.merge_size, min_pixels=min_pixels,
                                max_pixels=max_pixels)
            if (h, w) != (H, W):
                frames_THWC = np.stack([
                    np.asarray(Image.fromarray(_as_uint8(f)).resize((w, h), _RESAMPLE[self.resample]))
                    for f in frames_THWC
                ])
        unit = self.patch_size * self.merge_size
        if frames_THWC.shape[1] % unit or frames_THWC.shape[2] % unit:
            raise ValueError(f"frames of {frames_THWC.shape[2]}x{frames_THWC.shape[1]} are not multiples of {unit}: "
                             f"keep do_resize=True")
        # The same arithmetic as the image processor (float64 rescale, float32 normalise), so frames and images
        # give identical pixels.
        x = frames_THWC.astype(np.float64) * self.rescale_factor if self.do_rescale else frames_THWC
        x = x.astype(np.float32)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs: dict | None = None) -> int:
        kw = videos_kwargs or {}
        h, w = smart_resize(height, width, factor=self.patch_size * self.merge_size,
                            min_pixels=kw.get("min_pixels", self.size["shortest_edge"]),
                            max_pixels=kw.get("max_pixels", self.size["longest_edge"]))
        t = -(-num_frames // self.temporal_patch_size)
        return t * (h // self.patch_size) * (w // self.patch_size)

    get_number_of_video_patches = get_num_of_video_patches


def patchify_video(
    pixels_TCHW: np.ndarray, *, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
) -> tuple[np.ndarray, list[int]]:
    """[T, C, H, W] -> (patches [N, C*tp*p*p], [t, h, w] grid), rows in merge-group order: for each time
    step, each merge x merge block of patches is contiguous (the order the vision tower's merger expects)."""
    T, C, H, W = pixels_TCHW.shape
    if pad := -T % temporal_patch_size:
        pixels_TCHW = np.concatenate([pixels_TCHW, np.repeat(pixels_TCHW[-1:], pad, axis=0)])
        T += pad
    t, h, w = T // temporal_patch_size, H // patch_size, W // patch_size
    m, p, tp = merge_size, patch_size, temporal_patch_size
    x = pixels_TCHW.reshape(t, tp, C, h // m, m, p, w // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h/m, w/m, m, m, C, tp, p, p
    return np.ascontiguousarray(x.reshape(t * h * w, C * tp * p * p)), [t, h, w]


# ---- input normalisation ----
def _is_frame(x: Any) -> bool:
    if isinstance(x, Image.Image):
        return True
    return hasattr(x, "shape") and hasattr(x, "ndim") and x.ndim == 3


def _as_video_list(videos: Any) -> list:
    if videos is None:
        raise ValueError("no videos given")
    if isinstance(videos, (str, Path)) or (hasattr(videos, "ndim") and videos.ndim == 4):
        return [videos]
    if hasattr(videos, "ndim") and videos.ndim == 5:  # a batch of same-sized videos
        return list(videos)
    if isinstance(videos, (list, tuple)):
        if not videos:
            raise ValueError("videos is an empty list: pass at least one video")
        if all(_is_frame(v) for v in videos):
            return [list(videos)]  # one video given as a list of frames
        if all(isinstance(v, (list, tuple)) and not any(_is_frame(f) for f in v) for v in videos) and any(videos):
            # one list of videos per sample (how apply_chat_template(tokenize=True) passes them; a sample without
            # videos gives an empty list): flatten
            return [video for sample in videos if sample for video in _as_video_list(list(sample))]
        return list(videos)
    raise ValueError(f"videos must be a video (path, [T, H, W, 3] array/tensor or list of frames) or a list of them; "
                     f"got {type(videos).__name__}")


def _frames_array(video: Any, index: int) -> np.ndarray:
    """One video -> [T, H, W, 3] (uint8 or float in 0..255)."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"video {index} has no frames")
        frames = [np.asarray(load_image(f)) if isinstance(f, Image.Image) else _frame_hwc(f, index) for f in video]
        if len({f.shape for f in frames}) != 1:
            raise ValueError(f"the frames of video {index} differ in size: resize them to one size")
        return np.stack(frames)
    if hasattr(video, "detach"):  # torch tensor
        video = video.detach().cpu().float().numpy() if video.is_floating_point() else video.detach().cpu().numpy()
    if not isinstance(video, np.ndarray):
        raise MediaError(f"video {index} is a {type(video).__name__}: pass a path, a [T, H, W, 3] array or tensor, "
                         f"or a list of PIL images")
    if video.ndim != 4:
        raise ValueError(f"video {index} must be 4-D [T, H, W, 3] or [T, 3, H, W], got shape {video.shape}")
    if video.shape[-1] in (1, 3, 4):
        frames = video
    elif video.shape[1] in (1, 3, 4):
        frames = video.transpose(0, 2, 3, 1)
    else:
        raise ValueError(f"video {index} of shape {video.shape} has no channel axis of size 1, 3 or 4")
    return _rgb(frames, index)


def _frame_hwc(frame: Any, index: int) -> np.ndarray:
    if hasattr(frame, "detach"):
        frame = frame.detach().cpu().numpy()
    frame = np.asarray(frame)
    if frame.ndim != 3:
        raise ValueError(f"a frame of video {index} has shape {frame.shape}; frames are [H, W, 3] or [3, H, W]")
    frames = _frames_array(frame[None], index)
    return frames[0]


def _rgb(frames_THWC: np.ndarray, index: int) -> np.ndarray:
    if frames_THWC.dtype != np.uint8 and not np.issubdtype(frames_THWC.dtype, np.floating):
        frames_THWC = frames_THWC.astype(np.float32)
    C = frames_THWC.shape[-1]
    if C == 1:
        return np.repeat(frames_THWC, 3, axis=-1)
    if C == 4:
        return frames_THWC[..., :3]
    return frames_THWC


def _as_uint8(frame: np.ndarray) -> np.ndarray:
    return frame if frame.dtype == np.uint8 else np.clip(np.round(frame), 0, 255).astype(np.uint8)


def _rates(n: int, fps: Any) -> list[float | None]:
    if fps is None or isinstance(fps, (int, float)):
        return [fps] * n
    rates = list(fps)
    if len(rates) != n:
        raise ValueError(f"fps has {len(rates)} values for {n} videos: pass one per video or a single number")
    return rates


def _metadata_list(video_metadata: Any, n: int) -> list:
    if video_metadata is None:
        return [None] * n
    metas = video_metadata if isinstance(video_metadata, (list, tuple)) else [video_metadata]
    if metas and isinstance(metas[0], (list, tuple)):
        metas = [m for group in metas for m in group]
    if len(metas) != n:
        raise ValueError(f"video_metadata has {len(metas)} entries for {n} videos: pass one per video")
    return list(metas)


# ---- registration ----
def register_video_processor(config_class: type) -> bool:
    """Makes `AutoProcessor` / `AutoVideoProcessor` work without torchvision. Does nothing (returns False)
    when torchvision imports, or when this transformers has no torchvision-free video processor base."""
    if torchvision_available() or _video_processor_base() is None:
        return False
    import transformers
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor

    AutoVideoProcessor.register(config_class, video_processor_classes={"torchvision": Qwen2VLVideoProcessor},
                                exist_ok=True)
    # ProcessorMixin checks each sub-processor with isinstance against `transformers.<base class name>`; the
    # torchvision-free base is not exported at the top level, so the check cannot resolve it without this.
    if not hasattr(transformers, "VideoProcessorMixin"):
        transformers.VideoProcessorMixin = _video_processor_base()
    return True
