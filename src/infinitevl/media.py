"""Reading images and videos for the model, with errors that say what is wrong and what to do.

Legend: T frames, H height, W width.

- `load_image`: a PIL image, a local path, `file://...`, `data:image/...;base64,...` or an http(s) URL -> RGB PIL image.
- `load_video`: a video file or data URI (PyAV) -> frames sampled at `fps` (uint8 [T, H, W, 3]) and the rate they
  represent.
- `process_vision_info`: chat `messages` -> (images, videos), like `qwen_vl_utils.process_vision_info` (same
  message format and the same resize / frame-count rules), without torchvision.
"""
from __future__ import annotations

import base64
import io
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# The rules of qwen_vl_utils (the reference preprocessing of Qwen2.5-VL and the released InfiniteVL).
PATCH_FACTOR = 28  # patch_size 14 * spatial merge 2
IMAGE_MIN_TOKENS, IMAGE_MAX_TOKENS = 4, 16384
VIDEO_MIN_TOKENS, VIDEO_MAX_TOKENS = 128, 768
VIDEO_TOTAL_TOKENS = int(128000 * 0.9)  # the whole video's budget: 90% of a 128K context
DEFAULT_FPS, FRAME_FACTOR, MIN_FRAMES, MAX_FRAMES = 2.0, 2, 4, 768
MAX_ASPECT_RATIO = 200
MAX_PIXELS = IMAGE_MAX_TOKENS * PATCH_FACTOR**2  # no image or video frame is resized above this (16384 tokens)
MAX_VIDEO_PIXELS = 4 * VIDEO_TOTAL_TOKENS * PATCH_FACTOR**2  # all frames of one video together (~1 GB of RGB)
URL_TIMEOUT_S = 30
MAX_URL_BYTES = 64 << 20  # an image fetched from a URL


class MediaError(ValueError):
    """An image or video that cannot be used: missing, unreadable, corrupt, or of the wrong type."""


# ---- images ----
def load_image(source: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, a path, `file://`, `data:image/...;base64,` or an http(s) URL.
    Transparent pixels are composited on white (as qwen_vl_utils does)."""
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise MediaError(
            f"an image must be a PIL.Image, a path, a file:// or data: URI or an http(s) URL; got {type(source).__name__}"
        )
    if source.startswith("data:"):
        return _decode_image(io.BytesIO(_data_uri(source, "image")), "the data URI image")
    if source.startswith(("http://", "https://")):
        return _decode_image(io.BytesIO(_fetch_url(source)), source)
    path = Path(source[len("file://"):] if source.startswith("file://") else source)
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError) as e:  # a name too long for the file system, ...
        raise MediaError(f"cannot use {source!r:.80} as an image path ({e})") from None
    if is_dir:
        raise MediaError(f"{path} is a directory, not an image file: give the image's own path")
    if not is_file:
        raise MediaError(f"image file not found: {path} (check the path; URLs must start with http:// or https://)")
    return _decode_image(path, str(path))


def _decode_image(fp, name: str) -> Image.Image:
    try:
        with Image.open(fp) as img:
            img.load()  # decode now: PIL is lazy and a truncated file would only fail later
            return _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name} is too large to decode ({e}): give a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MediaError(f"cannot decode {name} as an image ({e}): the file is corrupt, truncated or not an image") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGBA":
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(img, mask=img.split()[3])
        return out
    return img.convert("RGB")


def _data_uri(source: str, kind: str) -> bytes:
    """The bytes of a `data:<kind>/<format>;base64,<data>` URI."""
    head, sep, payload = source.partition("base64,")
    if not sep or not head.startswith(f"data:{kind}"):
        raise MediaError(f"a data URI {kind} must look like 'data:{kind}/<format>;base64,<data>'")
    try:
        return base64.b64decode(payload, validate=False)
    except ValueError as e:
        raise MediaError(f"the data URI {kind} is not valid base64: {e}") from e


def _fetch_url(url: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            data = response.read(MAX_URL_BYTES + 1)
    except (OSError, ValueError) as e:
        raise MediaError(f"cannot download {url:.200}: {e}; download it and pass the local path") from e
    if len(data) > MAX_URL_BYTES:
        raise MediaError(f"{url:.200} is larger than {MAX_URL_BYTES >> 20} MiB: download it and pass the local path")
    return data


# ---- videos ----
def load_video(
    source: str | Path,
    fps: float = DEFAULT_FPS,
    max_frames: int | None = None,
    *,
    min_frames: int = MIN_FRAMES,
    as_pil: bool = False,
) -> tuple[np.ndarray | list[Image.Image], float]:
    """Frames of a video file (or a `data:video/...;base64,` URI) sampled uniformly at about `fps` and the rate
    they represent: (uint8 [T, H, W, 3] or T PIL images, fps_used). T is even (the vision tower pairs frames), at least `min_frames` when the video has that
    many, at most `max_frames`; the frame choice is qwen_vl_utils' (`linspace(0, total - 1, T).round()`)."""
    import av

    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < FRAME_FACTOR:
        raise ValueError(f"max_frames must be >= {FRAME_FACTOR} (frames are used in pairs), got {max_frames}")
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise MediaError(f"a video must be a path to a video file; got {type(source).__name__}")
    if source.startswith(("http://", "https://")):
        raise MediaError(f"video URLs are not fetched: download {source} and pass the local path")
    if source.startswith("data:"):
        target, path = io.BytesIO(_data_uri(source, "video")), "the data URI video"
    else:
        path = Path(source[len("file://"):] if source.startswith("file://") else source)
        if not path.is_file():
            raise MediaError(f"video file not found: {path}")
        target = str(path)

    try:
        with av.open(target) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            stream = container.streams.video[0]
            native_fps = float(stream.average_rate or stream.base_rate or 0)
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if total < 1 or native_fps <= 0:
                raise MediaError(f"{path} reports no frames or no frame rate: re-encode it (e.g. ffmpeg -i in out.mp4)")
            try:
                n = _frame_count(total, native_fps, fps, min_frames=min_frames, max_frames=max_frames)
            except MediaError as e:
                raise MediaError(f"video {path}: {e}") from None
            width, height = stream.codec_context.width, stream.codec_context.height
            if n * width * height > MAX_VIDEO_PIXELS:  # before decoding: the frames are held at their own size
                raise MediaError(f"video {path}: {n} sampled frames of {width}x{height} are above the "
                                 f"{MAX_VIDEO_PIXELS} pixels one video may decode to: lower fps or max_frames, or "
                                 "downscale the video")
            wanted = np.linspace(0, total - 1, n).round().astype(int)
            container.seek(0)
            frames = _decode_frames(container, stream, wanted)
    except av.error.FFmpegError as e:
        raise MediaError(f"cannot decode video {path} ({e}): the file is corrupt, truncated or in an unsupported "
                         f"format; re-encode it (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4)") from e
    if len(frames) < n:
        raise MediaError(f"video {path} ended after {len(frames)} of the {n} sampled frames (of {total} announced): "
                         f"the file is truncated or corrupt; re-encode it")
    fps_used = n / total * native_fps
    if as_pil:
        return [Image.fromarray(f) for f in frames], fps_used
    return np.stack(frames), fps_used


def _frame_count(total: int, native_fps: float, fps: float, *, min_frames: int, max_frames: int | None) -> int:
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = (min(MAX_FRAMES, total) if max_frames is None else max_frames) // FRAME_FACTOR * FRAME_FACTOR
    n = min(max(total / native_fps * fps, lo), hi, total)
    n = int(n // FRAME_FACTOR * FRAME_FACTOR)
    if n < FRAME_FACTOR:
        raise MediaError(f"it has {total} frame(s) and a video needs at least {FRAME_FACTOR} (the vision tower pairs "
                         "frames): pass a still picture as an image instead")
    return n


def _decode_frames(container, stream, wanted: np.ndarray) -> list[np.ndarray]:
    stream.thread_type = "AUTO"
    frames: list[np.ndarray] = []
    k, last = 0, int(wanted[-1])
    for index, frame in enumerate(container.decode(stream)):
        if index > last:
            break
        if index == wanted[k]:
            rgb = frame.to_ndarray(format="rgb24")
            # linspace may pick one frame twice for short videos
            while k < len(wanted) and wanted[k] == index:
                frames.append(rgb)
                k += 1
    return frames


# ---- chat messages ----
def smart_resize(height: int, width: int, *, factor: int = PATCH_FACTOR, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, with the pixel count within [min_pixels, max_pixels]
    and the aspect ratio kept as well as possible (the Qwen2-VL rule)."""
    if min(height, width) < 1:
        raise MediaError(f"an image of size {width}x{height} has no pixels")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above {MAX_ASPECT_RATIO}: "
                         f"crop or pad the image")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def vision_items(messages: list[dict] | list[list[dict]]) -> list[dict]:
    """The image/video content items of one conversation (or a batch of them), in order."""
    return [item for _, item in _located_items(messages)]


def _located_items(messages: list[dict] | list[list[dict]]) -> list[tuple[str, dict]]:
    """(where, item) for the image/video items: where = 'message i, item j' (with 'conversation c, ' in a batch)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    batch = not isinstance(messages[0], dict)
    conversations = messages if batch else [messages]
    items = []
    for c, conversation in enumerate(conversations):
        for i, message in enumerate(conversation):
            if not isinstance(message, dict) or "content" not in message:
                raise ValueError(f"each message must be a dict with 'role' and 'content', got {message!r:.80}")
            content = message["content"]
            if isinstance(content, list):
                items.extend((f"{f'conversation {c}, ' if batch else ''}message {i}, item {j}", item)
                             for j, item in enumerate(content) if isinstance(item, dict) and item_kind(item) is not None)
    return items


def item_kind(item: dict) -> str | None:
    """'image', 'video' or None (text, or anything else) for one content item."""
    if "image" in item or "image_url" in item or item.get("type") in ("image", "image_url"):
        return "image"
    if "video" in item or item.get("type") == "video":
        return "video"
    return None


def _option(item: dict, key: str, default: Any = None, *, whole: bool = False) -> Any:
    """A number-valued option of a content item (min_pixels, fps, ...): positive and finite, else a ValueError."""
    value = item.get(key, default)
    if value is None:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (whole and value != int(value)):
        raise ValueError(f"{key} must be a positive {'whole ' if whole else ''}number, got {value!r} "
                         f"(in the {_named(item)})")
    return int(value) if whole else value


def _named(item: dict) -> str:
    """'image item for photo.jpg' or the like, for errors."""
    kind = item_kind(item) or "content"
    src = item.get(kind, item.get("image_url"))
    if isinstance(src, dict):
        src = src.get("url")
    if isinstance(src, (list, tuple)):
        return f"{kind} item of {len(src)} frames"
    name = Path(src).name if isinstance(src, (str, Path)) and not str(src).startswith("data:") else None
    return f"{kind} item for {name}" if name else f"{kind} item"


def _resized(item: dict, height: int, width: int, *, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """The size an image or frame is resized to (`resized_height` + `resized_width` win), at most MAX_PIXELS."""
    if "resized_height" in item and "resized_width" in item:
        rh, rw = _option(item, "resized_height", whole=True), _option(item, "resized_width", whole=True)
        h, w = smart_resize(rh, rw, min_pixels=0, max_pixels=2**62)
        cause = "resized_height x resized_width"
    else:
        h, w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        cause = "min_pixels" if h * w > height * width else "the image's own size (lower max_pixels)"
    if h * w > MAX_PIXELS:
        raise ValueError(f"{cause} would make a {w}x{h} image, above the {MAX_PIXELS} pixels ({IMAGE_MAX_TOKENS} "
                         f"visual tokens) one image or frame may have: ask for fewer pixels (in the {_named(item)})")
    return h, w


def fetch_image(item: dict) -> Image.Image:
    """One `{"type": "image", "image": ...}` item -> a PIL image resized to multiples of 28 (honours
    `min_pixels`, `max_pixels`, `resized_height` + `resized_width`)."""
    src = item.get("image", item.get("image_url"))
    if isinstance(src, dict):  # OpenAI style {"image_url": {"url": ...}}
        src = src.get("url")
    if src is None:
        raise ValueError(f"image item without an 'image' value: {item!r:.80}")
    min_pixels = _option(item, "min_pixels", IMAGE_MIN_TOKENS * PATCH_FACTOR**2)
    max_pixels = _option(item, "max_pixels", IMAGE_MAX_TOKENS * PATCH_FACTOR**2)
    img = load_image(src)
    h, w = _resized(item, img.height, img.width, min_pixels=min_pixels, max_pixels=max_pixels)
    return img.resize((w, h), Image.Resampling.BICUBIC) if (w, h) != img.size else img


def fetch_video(item: dict) -> tuple[np.ndarray, float]:
    """One `{"type": "video", "video": ...}` item -> (uint8 frames [T, H, W, 3] resized to multiples of 28,
    fps of the sampled frames). `video` is a path or a list of frame images; honours `fps`, `min_frames`,
    `max_frames`, `min_pixels`, `max_pixels`, `total_pixels`, `resized_height` + `resized_width`."""
    src = item.get("video")
    fps = _option(item, "fps", DEFAULT_FPS)
    min_pixels = _option(item, "min_pixels", VIDEO_MIN_TOKENS * PATCH_FACTOR**2)
    total_pixels = _option(item, "total_pixels", VIDEO_TOTAL_TOKENS * PATCH_FACTOR**2)
    max_pixels = _option(item, "max_pixels")
    min_frames = _option(item, "min_frames", MIN_FRAMES, whole=True)
    max_frames = _option(item, "max_frames", whole=True)
    sample_fps = _option(item, "sample_fps", DEFAULT_FPS)
    if isinstance(src, (list, tuple)):
        if not src:
            raise ValueError("a video given as a list of frames needs at least one frame")
        frames = [np.asarray(load_image(f)) for f in src]
        if len({f.shape for f in frames}) != 1:
            raise MediaError("the frames of one video must all have the same size")
        if len(frames) % FRAME_FACTOR:
            frames.append(frames[-1])  # frames are used in pairs: repeat the last one
        frames_THWC, fps_used = np.stack(frames), float(sample_fps)
    elif isinstance(src, (str, Path)):
        frames_THWC, fps_used = load_video(src, fps=fps, max_frames=max_frames, min_frames=min_frames)
    else:
        raise MediaError(f"a video must be a path or a list of frames; got {type(src).__name__}")
    T, H, W = frames_THWC.shape[:3]
    budget = max(min(VIDEO_MAX_TOKENS * PATCH_FACTOR**2, total_pixels / T * FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = budget if max_pixels is None else min(max_pixels, budget)
    h, w = _resized(item, H, W, min_pixels=min_pixels, max_pixels=max_pixels)
    if T * h * w > MAX_VIDEO_PIXELS:
        raise ValueError(f"{T} frames of {w}x{h} are above the {MAX_VIDEO_PIXELS} pixels one video may have: lower "
                         f"fps, max_frames or the frame size (in the {_named(item)})")
    if (h, w) != (H, W):
        frames_THWC = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC))
                                for f in frames_THWC])
    return frames_THWC, fps_used


def process_vision_info(
    messages: list[dict] | list[list[dict]], *, return_video_kwargs: bool = False
) -> tuple[list[Image.Image] | None, list[np.ndarray] | None] | tuple[
        list[Image.Image] | None, list[np.ndarray] | None, dict[str, Any]]:
    """(images, videos) of the chat `messages`, in order, ready for the processor. With
    `return_video_kwargs`, also {"video_metadata": [{"fps": ..., "total_num_frames": ...}, ...]}: pass it to the
    processor (`processor(..., **video_kwargs)`) so `second_per_grid_ts` uses the rate of the sampled frames
    (transformers' own video processor assumes 24 fps for bare frames)."""
    images: list[Image.Image] = []
    videos: list[np.ndarray] = []
    metadata: list[dict[str, Any]] = []
    for where, item in _located_items(messages):
        try:
            if item_kind(item) == "image":
                images.append(fetch_image(item))
            else:
                frames, fps_used = fetch_video(item)
                videos.append(frames)
                metadata.append({"fps": fps_used, "total_num_frames": len(frames)})
        except ValueError as e:  # MediaError too: the same type, located
            raise type(e)(f"{where}: {e}") from None
    out = (images or None, videos or None)
    if return_video_kwargs:
        return (*out, {"video_metadata": metadata} if metadata else {})
    return out
