"""VideoSource: frames + timestamps from a video file (sampled by time, resized), a directory of images, and
clear errors for missing, corrupt, truncated or empty sources."""
import numpy as np
import pytest
from PIL import Image

from infinitevl.inference.video_source import VideoSource
from infinitevl.media import MediaError

from ..conftest import MEDIA


def test_video_file_sampled_by_time_and_resized():
    frames = list(VideoSource(MEDIA / "1.mp4", fps=2, size=(56, 84)))
    ts = [t for _, t in frames]
    assert len(frames) == 20 and ts[0] == 0.0  # 9.7 s at 2 fps
    assert all(0 <= t - i / 2 < 0.05 for i, t in enumerate(ts))
    assert all(f.shape == (56, 84, 3) and f.dtype == np.uint8 for f, _ in frames)


def test_directory_of_images_sorted_with_index_timestamps(tmp_path):
    for name, colour in (("b.png", (0, 255, 0)), ("a.jpg", (255, 0, 0)), ("c.webp", (0, 0, 255))):
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    frames = list(VideoSource(tmp_path, fps=4, size=(28, 56)))
    assert [t for _, t in frames] == [0.0, 0.25, 0.5]
    assert [int(np.argmax(f[10, 10])) for f, _ in frames] == [0, 1, 2]  # a, b, c
    assert frames[0][0].shape == (28, 56, 3)


def test_numbered_frames_in_natural_order_and_home_paths(tmp_path, monkeypatch):
    for k in (1, 2, 10):
        Image.new("RGB", (28, 28), (k, 0, 0)).save(tmp_path / f"frame_{k}.png")
    assert [int(f[0, 0, 0]) for f, _ in VideoSource(tmp_path)] == [1, 2, 10]
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    assert len(list(VideoSource(f"~/{tmp_path.name}"))) == 3


def test_bad_sources_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        VideoSource(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        VideoSource(tmp_path / "missing.mp4")
    data = (MEDIA / "1.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.mp4").write_bytes(b"not a video" * 50)
    for name in ("cut.mp4", "text.mp4"):
        with pytest.raises(MediaError, match="corrupt"):
            list(VideoSource(tmp_path / name))
    with pytest.raises(ValueError, match="fps"):
        VideoSource(MEDIA / "1.mp4", fps=0)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(MediaError, match="bad.png"):
        list(VideoSource(tmp_path))
    with pytest.raises(MediaError, match="cannot open"):
        list(VideoSource("http://127.0.0.1:1/stream.mp4"))
    for bad in (float("inf"), True):
        with pytest.raises(ValueError, match="fps must be a finite number"):
            VideoSource(MEDIA / "1.mp4", fps=bad)
    for bad in ((448.5, 448), (448,), (-1, 448), "448"):
        with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
            VideoSource(MEDIA / "1.mp4", size=bad)
    for url in ("ftp://example.invalid/x.mp4", "s3://bucket/x.mp4"):
        with pytest.raises(MediaError, match="sources are not read"):
            VideoSource(url)


def test_one_number_is_a_square_size():
    frame, t = next(iter(VideoSource(MEDIA / "1.mp4", size=56)))
    assert frame.shape == (56, 56, 3) and t == 0.0
