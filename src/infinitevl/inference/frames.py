"""Frame preprocessing in torch (CPU or GPU), for streams where PIL per frame would be the bottleneck.

Legend: B frames, H/W pixels, C channels, N patches per frame, P = C * temporal_patch * patch^2.

A frame is resized to a fixed size (multiples of patch * merge), normalised with the CLIP mean/std,
repeated over the temporal patch (a still frame, as Qwen2.5-VL does for images) and cut into patches
in the processor's merge-group order, so the vision encoder sees exactly what the Qwen2.5-VL image
processor would produce for the same resized pixels.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..media import MAX_PIXELS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class FrameSpec:
    height: int = 448
    width: int = 448
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2

    def __post_init__(self):
        for name in ("height", "width", "patch_size", "temporal_patch_size", "merge_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ValueError(f"FrameSpec.{name} must be a positive whole number, got {v!r}")
            object.__setattr__(self, name, int(v))
        unit = self.patch_size * self.merge_size
        if self.height % unit or self.width % unit:
            raise ValueError(f"frame size {self.height}x{self.width} must be positive multiples of {unit}")
        if self.height * self.width > MAX_PIXELS:
            raise ValueError(f"frame size {self.height}x{self.width} is above the {MAX_PIXELS} pixels a frame may "
                             f"have ({MAX_PIXELS // unit**2} visual tokens): use a smaller frame size")

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        return 1, self.height // self.patch_size, self.width // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        _, h, w = self.grid_thw
        return h * w // self.merge_size**2


def frames_to_tensor(frames) -> torch.Tensor:
    """Accepts a PIL image, a uint8 array/tensor [H,W,3] or [B,H,W,3], or a list of those (same size).
    Returns uint8 [B, H, W, 3]."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("no frames given")
        parts = [frames_to_tensor(f) for f in frames]
        if len({tuple(p.shape[1:]) for p in parts}) != 1:
            raise ValueError("frames in one batch must have the same size: resize them first")
        return torch.cat(parts)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(frames, Image.Image):
        from ..media import load_image

        frames = np.asarray(load_image(frames))  # transparency on white, as for images from files
    if isinstance(frames, np.ndarray):
        # decoders hand out read-only arrays; torch wants writable memory
        frames = torch.from_numpy(np.ascontiguousarray(frames) if frames.flags.writeable else frames.copy())
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"a frame must be a PIL image or a uint8 array [H, W, 3]; got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        hint = ""
        if frames.is_floating_point():
            hint = " (floats in [0, 1]: (x * 255).round().clamp(0, 255) cast to uint8)"
        elif frames.dtype == torch.uint8:
            hint = " (grey: repeat it to 3 channels; RGBA: drop the alpha; channels first: move them last)"
        raise ValueError(
            f"a frame must be uint8 [H, W, 3] (RGB) or [B, H, W, 3]; got {frames.dtype} {tuple(frames.shape)}{hint}"
        )
    if frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"a frame must have at least one pixel; got size {frames.shape[2]}x{frames.shape[1]}")
    if frames.device.type == "meta":
        raise ValueError("a frame must hold pixels: got a meta tensor (no data)")
    return frames


def clip_stats(device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP mean and std as [1, 3, 1, 1] tensors on `device` (make them once for a captured step)."""
    return (torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1))


def preprocess_frames(frames_BHWC: torch.Tensor, spec: FrameSpec, *, dtype=torch.float32,
                      stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> pixel patches [B * N, P] in the processor's layout. `stats`: `clip_stats`
    made beforehand (inside a CUDA graph no host tensor may be copied to the device)."""
    B = frames_BHWC.shape[0]
    x = frames_BHWC.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (spec.height, spec.width):
        x = F.interpolate(x, size=(spec.height, spec.width), mode="bicubic", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)
    x = x / 255.0
    mean, std = stats if stats is not None else clip_stats(x.device)
    x = (x - mean) / std
    return patchify(x[:, None].expand(B, spec.temporal_patch_size, 3, spec.height, spec.width), spec).to(dtype)


def patchify(x_BTCHW: torch.Tensor, spec: FrameSpec) -> torch.Tensor:
    """[B, tp, C, H, W] (one temporal patch per item) -> [B * gh * gw, C * tp * p * p], merge groups
    consecutive, each patch flattened channel-major then time then rows then columns."""
    B, tp, C, H, W = x_BTCHW.shape
    p, m = spec.patch_size, spec.merge_size
    gh, gw = H // p, W // p
    x = x_BTCHW.reshape(B, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # B, gh/m, gw/m, m, m, C, tp, p, p
    return x.reshape(B * gh * gw, C * tp * p * p)
