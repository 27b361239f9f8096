"""AutoProcessor on a released-format directory without torchvision, and the torchvision-free video processor
against transformers' image processor (same resize, normalisation and patch order)."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLImageProcessorPil

import infinitevl  # noqa: F401  (registers the Auto classes)
from infinitevl.media import load_video
from infinitevl.processing import Qwen2VLVideoProcessor, patchify_video, torchvision_available

from .conftest import MEDIA, QWEN_TOKENIZER

IMAGE_PAD, VIDEO_PAD = 151655, 151656


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("released")
    for f in QWEN_TOKENIZER.iterdir():
        if f.suffix in (".json", ".txt", ".jinja"):
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def processor(processor_dir):
    return AutoProcessor.from_pretrained(processor_dir)


def _video_processor(**kw):
    cfg = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
           "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    return Qwen2VLVideoProcessor(**{**cfg, **kw})


def _frames(T, H=90, W=130, seed=0):
    g = np.random.default_rng(seed)
    base = np.linspace(0, 255, H * W * 3).reshape(H, W, 3)
    return np.stack([(base + g.integers(0, 60, (H, W, 3))) % 256 for _ in range(T)]).astype(np.uint8)


def test_auto_processor_loads(processor):
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    if torchvision_available():
        assert type(processor.video_processor).__module__.startswith("transformers.")
    else:
        assert isinstance(processor.video_processor, Qwen2VLVideoProcessor)
        assert processor.video_processor.size == {"shortest_edge": 3136, "longest_edge": 12845056}


def test_two_frame_video_has_the_image_processors_patch_layout():
    """A t=2 grid: the patch of frame k in temporal slot k must equal the image processor's patch of frame k
    (which fills both slots with the one image), at the same resized size and row order."""
    frames = _frames(2)
    video = _video_processor()(frames[None], return_tensors="np")
    image = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    per_frame = [image(Image.fromarray(f), return_tensors="np") for f in frames]
    assert video["video_grid_thw"].tolist() == [[1, *per_frame[0]["image_grid_thw"][0, 1:].tolist()]]
    v = video["pixel_values_videos"].reshape(-1, 3, 2, 14, 14)
    for k in range(2):
        img = per_frame[k]["pixel_values"].reshape(-1, 3, 2, 14, 14)
        assert v.shape == img.shape
        np.testing.assert_array_equal(v[:, :, k], img[:, :, k])


def test_patchify_groups_frames_and_repeats_the_last():
    pixels_TCHW = np.random.default_rng(0).standard_normal((3, 3, 56, 84)).astype(np.float32)
    patches, grid = patchify_video(pixels_TCHW)
    assert grid == [2, 4, 6] and patches.shape == (48, 3 * 2 * 14 * 14)
    p = patches.reshape(2, 2, 3, 2, 2, 3, 2, 14, 14)  # t, h/2, w/2, 2, 2, C, tp, 14, 14
    # second time step: frame 2 in both temporal slots; merge block (1, 2), inner (0, 1) is patch row 2, col 5
    np.testing.assert_array_equal(p[1, 1, 2, 0, 1, :, 0], pixels_TCHW[2, :, 28:42, 70:84])
    np.testing.assert_array_equal(p[1, 1, 2, 0, 1, :, 1], pixels_TCHW[2, :, 28:42, 70:84])


def test_input_layouts_agree():
    frames = _frames(4, 56, 56)
    vp = _video_processor()
    ref = vp(frames[None])["pixel_values_videos"]
    for video in (frames, torch.from_numpy(frames).permute(0, 3, 1, 2), torch.from_numpy(frames).float(),
                  [Image.fromarray(f) for f in frames], list(frames)):
        assert np.array_equal(vp(video)["pixel_values_videos"], ref)


def test_second_per_grid_ts(processor):
    text = ["<|vision_start|><|video_pad|><|vision_end|>Describe."]
    frames = _frames(4, 56, 56)
    default = processor(text=text, videos=[frames], return_tensors="pt")
    assert default["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert int((default["input_ids"] == VIDEO_PAD).sum()) == 2 * 4 * 4 // 4
    if not torchvision_available():  # transformers' own class assumes 24 fps for bare frames
        assert default["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per grid step at 2 fps
        assert processor(text=text, videos=[frames], fps=4.0)["second_per_grid_ts"] == [0.5]
    meta = processor(text=text, videos=[frames], video_metadata=[{"fps": 1.0, "total_num_frames": 4}])
    assert meta["second_per_grid_ts"] == [2.0]


def test_processor_on_real_media(processor):
    images = [Image.open(MEDIA / "1.jpg"), Image.open(MEDIA / "2.jpg")]
    text = ["<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>Compare.",
            "<|vision_start|><|video_pad|><|vision_end|>What happens?"]
    frames, fps = load_video(MEDIA / "3.mp4", fps=1.0)
    out = processor(text=text, images=images, videos=[frames], padding=True, return_tensors="pt",
                    video_metadata=[{"fps": fps, "total_num_frames": len(frames)}])
    grids = out["image_grid_thw"]
    assert out["pixel_values"].shape == (int(grids.prod(-1).sum()), 1176)
    assert int((out["input_ids"][0] == IMAGE_PAD).sum()) == int(grids.prod(-1).sum()) // 4
    vgrid = out["video_grid_thw"][0]
    assert vgrid[0] == len(frames) // 2 and (vgrid[1:] * 14 % 28 == 0).all()
    assert out["pixel_values_videos"].shape == (int(vgrid.prod()), 1176)
    assert int((out["input_ids"][1] == VIDEO_PAD).sum()) == int(vgrid.prod()) // 4
    assert out["second_per_grid_ts"].tolist() == pytest.approx([2 / fps])


@pytest.mark.skipif(torchvision_available(), reason="the torchvision-free video processor is not in use")
def test_video_path_through_the_processor(processor):
    text = ["<|vision_start|><|video_pad|><|vision_end|>?"]
    by_path = processor(text=text, videos=[str(MEDIA / "3.mp4")], fps=1.0)
    frames, fps = load_video(MEDIA / "3.mp4", fps=1.0)
    by_frames = processor(text=text, videos=[frames], fps=fps)
    assert np.array_equal(by_path["pixel_values_videos"], by_frames["pixel_values_videos"])
    assert by_path["second_per_grid_ts"] == pytest.approx(by_frames["second_per_grid_ts"])


@pytest.mark.skipif(torchvision_available(), reason="the torchvision-free video processor is not in use")
def test_chat_template_tokenizes_a_video_message(processor):
    """apply_chat_template(tokenize=True) passes one list of videos per conversation, and fps as frame sampling."""
    messages = [{"role": "user", "content": [{"type": "video", "video": str(MEDIA / "3.mp4")},
                                             {"type": "text", "text": "What happens?"}]}]
    for fps in (None, 1.0):
        out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt", **({} if fps is None else {"fps": fps}))
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        frames, rate = load_video(MEDIA / "3.mp4", fps=fps or 2.0)
        want = processor(text=[text], videos=[frames], fps=rate, return_tensors="pt")
        assert out["video_grid_thw"].tolist() == want["video_grid_thw"].tolist()
        assert out["input_ids"].tolist() == want["input_ids"].tolist()
    nested = _video_processor()([[str(MEDIA / "3.mp4")], [str(MEDIA / "1.mp4")]])
    assert len(nested["video_grid_thw"]) == 2
    assert len(_video_processor()([[], [str(MEDIA / "3.mp4")]])["video_grid_thw"]) == 1  # a sample without videos


def test_bad_video_inputs(tmp_path):
    vp = _video_processor()
    data = (MEDIA / "1.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated"):
        vp([str(tmp_path / "truncated.mp4")])
    with pytest.raises(ValueError, match="not found"):
        vp([str(tmp_path / "missing.mp4")])
    for bad, match in ((object(), "videos must be"), ([object()], "is a object"), ([np.zeros((2, 5, 8, 8))], "channel"),
                       ([np.zeros((8, 8))], "4-D"), ([], "empty"),
                       ([[np.zeros((28, 28, 3)), np.zeros((56, 56, 3))]], "differ in size")):
        with pytest.raises(ValueError, match=match):
            vp(bad)
    with pytest.raises(ValueError, match="do_sample_frames"):
        vp(_frames(2), do_sample_frames=True)
    with pytest.raises(ValueError, match="one per video"):
        vp([_frames(2), _frames(2)], fps=[1.0])


def test_save_and_reload(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert type(again.video_processor) is type(processor.video_processor)
    frames = _frames(2, 56, 56)
    assert np.array_equal(again.video_processor(frames)["pixel_values_videos"],
                          processor.video_processor(frames)["pixel_values_videos"])
