"""Frames for a stream: (frame, timestamp) pairs from a video file, a directory of images, or a live URL.

Legend: H, W frame height and width.

- a video file (any container/codec FFmpeg decodes, through PyAV): frames sampled at `fps` by their own
  timestamps (the first frame at or after each tick 0, 1/fps, 2/fps, ...), timestamps in seconds from the
  first frame;
- a directory of images (jpg, jpeg, png, bmp, webp), in natural name order (frame_2 before frame_10);
  timestamp = index / fps;
- a URL (rtsp://, rtmp://, http(s)://, udp://, tcp://) or a webcam device (/dev/videoN), opened through PyAV
  and sampled like a file (live sources run until they end or the caller stops).
Each frame is uint8 [H, W, 3] RGB, resized to `size` (height, width) when given. Anything unusable raises
`media.MediaError` (a ValueError) naming the source and what is wrong.
"""
from __future__ import annotations

import numbers
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..media import MediaError, load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LIVE_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://")
OPEN_TIMEOUT_S = 10.0


def natural_key(path: Path) -> list:
    """Sort key reading digit runs as numbers: frame_2.png before frame_10.png."""
    return [(0, int(part), part) if part.isascii() and part.isdigit() else (1, 0, part)
            for part in re.split(r"([0-9]+)", path.name)]


class VideoSource:
    def __init__(self, source: str | Path, *, fps: float = 2.0, size: tuple[int, int] | None = None):
        """size: (height, width) to resize every frame to (e.g. the session's FrameSpec), or None."""
        if isinstance(fps, bool) or not (isinstance(fps, numbers.Real) and 1e-6 <= fps < float("inf")):
            raise ValueError(f"fps must be a finite number >= 1e-6 (frames a second), got {fps!r}")
        if isinstance(size, numbers.Integral) and not isinstance(size, bool):
            size = (size, size)
        if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 2 or not all(
                isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1 for x in size)):
            raise ValueError(f"size must be (height, width) in whole pixels (or one number for a square), got {size!r}")
        if not isinstance(source, (str, Path)) or not str(source).strip():
            raise MediaError(f"a video source is a path, a directory or a URL; got {source!r:.60}")
        scheme = str(source).partition("://")[0] if "://" in str(source) else None
        if scheme is not None and not str(source).startswith(LIVE_PREFIXES + ("file://",)):
            raise MediaError(f"{source}: {scheme}:// sources are not read; give a file, a directory of images, or a "
                             f"URL starting with {', '.join(LIVE_PREFIXES)} (download other sources first)")
        if scheme is None:
            source = Path(source).expanduser()
        self.source, self.fps = str(source), float(fps)
        self.size = None if size is None else tuple(int(x) for x in size)
        self.live = self.source.startswith(LIVE_PREFIXES) or self.source.startswith("/dev/video")
        path = Path(self.source[len("file://"):] if self.source.startswith("file://") else self.source)
        self.images: list[Path] | None = None
        if not self.live:
            if path.is_dir():
                self.images = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
                if not self.images:
                    raise MediaError(f"directory {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            elif not path.is_file():
                raise MediaError(f"video source not found: {path} (give a video file, a directory of images or a URL)")
        self.path = path

    def __iter__(self) -> Iterator[tuple[np.ndarray, float]]:
        if self.images is not None:
            return self._images()
        return self._video()

    def _resize(self, img: Image.Image) -> np.ndarray:
        if self.size is not None and (img.height, img.width) != tuple(self.size):
            img = img.resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC)
        return np.asarray(img.convert("RGB"))

    def _images(self) -> Iterator[tuple[np.ndarray, float]]:
        for i, p in enumerate(self.images):
            yield self._resize(load_image(p)), i / self.fps

    def _video(self) -> Iterator[tuple[np.ndarray, float]]:
        import av

        name = self.source if self.live else str(self.path)
        options = {}
        if self.source.startswith("/dev/video"):
            options["format"] = "v4l2"
        try:
            container = av.open(name, timeout=OPEN_TIMEOUT_S if self.live else None, **options)
        except (av.error.FFmpegError, OSError) as e:
            raise MediaError(f"cannot open {name} ({e}): not a video, corrupt, unreachable or in an unsupported "
                             f"format; re-encode it (e.g. ffmpeg -i in -c:v libx264 out.mp4)") from e
        with container:
            if not container.streams.video:
                raise MediaError(f"{name} has no video stream")
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise MediaError(f"{name}: no decoder for its video codec; re-encode it (e.g. ffmpeg -c:v libx264)")
            stream.thread_type = "AUTO"
            announced = stream.frames or 0
            first = None
            tick = 0
            decoded = 0
            try:
                for frame in container.decode(stream):
                    decoded += 1
                    t = frame.time if frame.time is not None else decoded / float(stream.average_rate or 25)
                    if first is None:
                        first = t
                    t -= first
                    if t + 1e-6 < tick / self.fps:
                        continue
                    tick = int(t * self.fps + 1e-6) + 1
                    yield self._resize(frame.to_image()), t
            except av.error.FFmpegError as e:
                raise MediaError(f"cannot decode {name} after {decoded} frames ({e}): the file is corrupt, truncated "
                                 f"or uses an unsupported codec; re-encode it") from e
            if decoded == 0:
                raise MediaError(f"{name} holds no decodable frames: it is empty, truncated or corrupt")
            if not self.live and announced and decoded < 0.9 * announced:
                raise MediaError(f"{name} ended after {decoded} of the {announced} frames it announces: the file is "
                                 f"truncated or corrupt; re-encode it")
