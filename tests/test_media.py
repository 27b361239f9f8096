"""infinitevl.media: image and video loading, and messages -> (images, videos) like qwen_vl_utils."""
import base64
import io
import sys
import types

import av
import numpy as np
import pytest
from PIL import Image

from infinitevl.media import (
    MediaError,
    load_image,
    load_video,
    process_vision_info,
    smart_resize,
)

from .conftest import MEDIA


@pytest.fixture(scope="module")
def qwen_vl_utils():
    """qwen_vl_utils imports torchvision at module level. Without torchvision (our CPU install), a minimal stub
    stands in while it is imported: only names it touches at import and on the image path exist (its video path
    needs the real torchvision and is not used here). The stub is removed from sys.modules afterwards so nothing
    else sees it."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        stub = types.ModuleType("torchvision")
        stub.__version__ = "0.0.0"
        stub.io = types.ModuleType("torchvision.io")
        stub.transforms = types.ModuleType("torchvision.transforms")
        stub.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
        stub.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        stubs = {"torchvision": stub, "torchvision.io": stub.io, "torchvision.transforms": stub.transforms,
                 "torchvision.transforms.functional": stub.transforms.functional}
        with pytest.MonkeyPatch.context() as mp:
            for name, module in stubs.items():
                mp.setitem(sys.modules, name, module)
            import qwen_vl_utils
            return qwen_vl_utils
    import qwen_vl_utils
    return qwen_vl_utils


# ---- images ----
def test_load_image_sources_agree(tmp_path):
    path = MEDIA / "1.jpg"
    ref = load_image(path)
    assert ref.mode == "RGB" and ref.size == Image.open(path).size
    data = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
    for src in (str(path), f"file://{path}", data, Image.open(path)):
        assert np.array_equal(np.asarray(load_image(src)), np.asarray(ref))


def test_load_image_composites_transparency_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(load_image(rgba))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]


def test_load_image_bad_inputs(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "truncated.jpg").write_bytes((MEDIA / "1.jpg").read_bytes()[:3000])
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    for name in ("corrupt.jpg", "truncated.jpg"):
        with pytest.raises(ValueError, match="corrupt, truncated or not an image"):
            load_image(tmp_path / name)
    with pytest.raises(ValueError, match="base64"):
        load_image("data:text/plain,hello")
    for bad in (123, object(), None, np.zeros((4, 4, 3))):
        with pytest.raises(ValueError, match="an image must be"):
            load_image(bad)
    assert issubclass(MediaError, ValueError)


# ---- videos ----
def test_load_video_samples_like_qwen_vl_utils(qwen_vl_utils):
    frames, fps_used = load_video(MEDIA / "1.mp4", fps=2.0)
    with av.open(str(MEDIA / "1.mp4")) as c:
        stream = c.streams.video[0]
        total, native = stream.frames, float(stream.average_rate)
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    n = qwen_vl_utils.vision_process.smart_nframes({"fps": 2.0}, total_frames=total, video_fps=native)
    assert frames.shape == (n, 360, 640, 3) and frames.dtype == np.uint8 and n % 2 == 0
    assert fps_used == pytest.approx(n / total * native)
    idx = np.linspace(0, total - 1, n).round().astype(int)
    for k in (0, n // 2, n - 1):
        assert np.array_equal(frames[k], decoded[idx[k]])


def test_load_video_limits_and_pil():
    frames, fps_used = load_video(f"file://{MEDIA / '3.mp4'}", fps=30.0, max_frames=6, as_pil=True)
    assert len(frames) == 6 and all(isinstance(f, Image.Image) for f in frames)
    few, _ = load_video(MEDIA / "3.mp4", fps=0.01)  # below min_frames: qwen_vl_utils' floor of 4 frames
    assert len(few) == 4
    with pytest.raises(ValueError, match="fps"):
        load_video(MEDIA / "3.mp4", fps=0)
    with pytest.raises(ValueError, match="max_frames"):
        load_video(MEDIA / "3.mp4", max_frames=1)


def test_load_video_from_a_data_uri():
    data = (MEDIA / "3.mp4").read_bytes()
    uri = "data:video/mp4;base64," + base64.b64encode(data).decode()
    frames, fps_used = load_video(uri, fps=1.0)
    same, same_fps = load_video(MEDIA / "3.mp4", fps=1.0)
    assert np.array_equal(frames, same) and fps_used == same_fps
    with pytest.raises(ValueError, match="must look like 'data:video/<format>;base64,<data>'"):
        load_video("data:image/png;base64,AAAA")
    bad = "data:video/mp4;base64," + base64.b64encode(data[: len(data) // 3]).decode()
    with pytest.raises(ValueError, match="the data URI video .*corrupt, truncated"):
        load_video(bad)


def test_oversized_media_are_refused_before_decoding(tmp_path, monkeypatch):
    import infinitevl.media as media

    monkeypatch.setattr(media, "MAX_VIDEO_PIXELS", 1000)
    with pytest.raises(ValueError, match="above the 1000 pixels one video may decode to"):
        load_video(MEDIA / "3.mp4")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's decompression-bomb limit (2x is an error)
    with pytest.raises(ValueError, match="too large to decode"):
        load_image(MEDIA / "1.jpg")
    with pytest.raises(ValueError, match="cannot use .* as an image path"):
        load_image("x" * 5000 + ".png")


def test_load_video_bad_files(tmp_path):
    data = (MEDIA / "1.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video" * 10)
    for name in ("truncated.mp4", "garbage.mp4"):
        with pytest.raises(ValueError, match="corrupt, truncated or in an unsupported format"):
            load_video(tmp_path / name)
    with pytest.raises(ValueError, match="not found"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="download"):
        load_video("https://example.com/v.mp4")
    with pytest.raises(ValueError, match="at least 2"):
        load_video(MEDIA / "1.jpg")  # one still frame
    with pytest.raises(ValueError, match="path"):
        load_video(np.zeros((2, 8, 8, 3)))


# ---- messages ----
def test_images_match_qwen_vl_utils(qwen_vl_utils):
    messages = [{"role": "user", "content": [
        {"type": "image", "image": str(MEDIA / "1.jpg")},
        {"type": "image", "image": str(MEDIA / "2.jpg"), "max_pixels": 28 * 28 * 20},
        {"type": "image", "image": str(MEDIA / "3.jpg"), "resized_height": 100, "resized_width": 60},
        {"type": "text", "text": "Compare them."},
    ]}]
    ours, no_videos = process_vision_info(messages)
    theirs, _ = qwen_vl_utils.process_vision_info(messages)
    assert no_videos is None and len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        assert a.size == b.size and a.size[0] % 28 == 0 and a.size[1] % 28 == 0
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_video_item_budget_and_metadata():
    messages = [{"role": "user", "content": [
        {"type": "video", "video": str(MEDIA / "1.mp4"), "fps": 1.0, "max_pixels": 28 * 28 * 16},
        {"type": "text", "text": "What happens?"},
    ]}]
    images, videos, kwargs = process_vision_info(messages, return_video_kwargs=True)
    (frames,) = videos
    assert images is None and frames.dtype == np.uint8
    T, H, W, _ = frames.shape
    assert T == 8 and H % 28 == 0 and W % 28 == 0 and H * W <= 28 * 28 * 16
    assert kwargs["video_metadata"][0]["total_num_frames"] == T
    assert kwargs["video_metadata"][0]["fps"] == pytest.approx(T / 243 * 25)
    # a video given as frames: an odd count gets its last frame repeated
    listed = [{"role": "user", "content": [{"type": "video", "video": [Image.new("RGB", (56, 56))] * 3}]}]
    _, (frames,) = process_vision_info(listed)
    assert frames.shape[0] == 4


def test_messages_bad_input(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="corrupt"):
        process_vision_info([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "corrupt.png")}]}])
    with pytest.raises(ValueError, match="an image must be"):
        process_vision_info([{"role": "user", "content": [{"type": "image", "image": object()}]}])
    with pytest.raises(ValueError, match="messages"):
        process_vision_info([])
    with pytest.raises(ValueError, match="'content'"):
        process_vision_info([{"role": "user"}])
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000, min_pixels=0, max_pixels=10**9)


@pytest.mark.parametrize("kind, options, message", [
    ("image", {"min_pixels": 1e12}, "min_pixels would make a .* above the 12845056 pixels"),
    ("image", {"resized_height": 100000, "resized_width": 100000}, "resized_height x resized_width would make"),
    ("image", {"max_pixels": "big"}, "max_pixels must be a positive number, got 'big'"),
    ("image", {"resized_height": "a", "resized_width": 28}, "resized_height must be a positive whole number"),
    ("image", {"min_pixels": float("nan")}, "min_pixels must be a positive number"),
    ("video", {"fps": "2"}, "fps must be a positive number, got '2'"),
    ("video", {"fps": 0}, "fps must be a positive number"),
    ("video", {"max_frames": 1.5}, "max_frames must be a positive whole number"),
    ("video", {"min_pixels": 1e12}, "min_pixels would make"),
])
def test_item_options_are_checked_and_sizes_capped(kind, options, message):
    """An item's options cannot ask for an image that does not fit in memory, nor be of the wrong type: a
    ValueError naming the option and the item."""
    src = str(MEDIA / ("1.jpg" if kind == "image" else "1.mp4"))
    with pytest.raises(ValueError, match=message) as e:
        process_vision_info([{"role": "user", "content": [{"type": kind, kind: src, **options}]}])
    assert f"{kind} item for 1.{'jpg' if kind == 'image' else 'mp4'}" in str(e.value)
    assert str(e.value).startswith("message 0, item 0: ")  # where it is in the messages


def test_item_options_take_numpy_numbers():
    item = {"type": "image", "image": str(MEDIA / "1.jpg"), "resized_height": np.int64(56),
            "resized_width": np.int64(84)}
    assert process_vision_info([{"role": "user", "content": [item]}])[0][0].size == (84, 56)


def test_media_errors_name_the_message_and_item():
    batch = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "s"},
              {"role": "user", "content": [{"type": "text", "text": "?"}, {"type": "image"}]}]]
    with pytest.raises(ValueError, match=r"^conversation 1, message 1, item 1: image item without an 'image'"):
        process_vision_info(batch)
    with pytest.raises(ValueError, match=r"^message 0, item 0: a video given as a list of frames needs"):
        process_vision_info([{"role": "user", "content": [{"type": "video", "video": []}]}])


def test_load_image_from_bytes_io_is_rejected():
    with pytest.raises(ValueError, match="an image must be"):
        load_image(io.BytesIO((MEDIA / "1.jpg").read_bytes()))
