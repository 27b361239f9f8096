"""Chat records -> tokens, labels and vision inputs; bad records give located errors or counted skips."""
from __future__ import annotations

import json

import pytest
import torch

from infinitevl.training.data import (
    IGNORE, BadSample, ChatDataset, DataConfig, chat_format_for, load_records, read_records,
)
from infinitevl.training.vision_inputs import VisionInputConfig, VisionInputs, load_frames, probe_video
from infinitevl.model.config import InfiniteVLConfig

from ..conftest import MEDIA
from .conftest import TINY_ASSET


@pytest.fixture(scope="module")
def fmt():
    cfg = InfiniteVLConfig.from_file(TINY_ASSET)
    return chat_format_for(TINY_ASSET, cfg, DataConfig(max_tokens=4096, vision=VisionInputConfig(image_max_pixels=112 * 112)))


def _write(tmp_path, records, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def test_tokens_match_the_chat_template_and_labels_cover_assistant_turns(fmt):
    recs = read_records(MEDIA / "mllm_demo.json")
    s = fmt.build(recs[0])
    # Same ids as the chat template rendered as text, with each image pad expanded.
    tok = fmt.tok
    msgs = [{"role": "system", "content": "You are a helpful assistant."}] + [
        {"role": m["role"], "content": m["content"].replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")}
        for m in recs[0].messages]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_pad = [int(g.prod()) // 4 for g in s.image_grid_thw]
    expanded, k = [], 0
    for t in ids:
        if t == fmt.image_id:
            expanded += [t] * n_pad[k]
            k += 1
        else:
            expanded.append(t)
    assert s.input_ids.tolist() == expanded
    # Labels: exactly the assistant answers followed by <|im_end|>\n.
    lab = s.labels[s.labels != IGNORE]
    want = "".join(m["content"] + "<|im_end|>\n" for m in recs[0].messages if m["role"] == "assistant")
    assert tok.decode(lab) == want
    assert s.pixel_values.shape[0] == int(s.image_grid_thw.prod(-1).sum())


def test_video_record_and_patch_layout(fmt, synth_dir):
    recs = [r for r in read_records(synth_dir / "train.jsonl") if r.videos]
    s = fmt.build(recs[0])
    assert s.video_grid_thw.tolist() == [[4, 8, 8]] and s.second_per_grid_ts.tolist() == [1.0]
    assert int((s.input_ids == fmt.video_id).sum()) == 4 * 8 * 8 // 4
    # Layout check against Qwen2-VL's video patchify written out independently.
    vi = VisionInputs(VisionInputConfig(video_max_pixels=112 * 112))
    info = probe_video(recs[0].videos[0], 2.0)
    idx, fps = vi.frame_plan(info.frames, info.fps)
    frames = load_frames(recs[0].videos[0], idx)
    resized = torch.stack([vi._frame(images=[f], return_tensors="pt", do_resize=True)["pixel_values"]
                           .view(8, 8, 3, 2, 14, 14)[..., 0, :, :].reshape(4, 4, 2, 2, 3, 14, 14)
                           .permute(4, 0, 2, 5, 1, 3, 6).reshape(3, 112, 112) for f in frames])  # [F, C, H, W]
    v = resized.view(4, 2, 3, 4, 2, 14, 4, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(4 * 64, 3 * 2 * 14 * 14)
    pixels, grid, _ = vi.video(frames, fps)
    torch.testing.assert_close(pixels, v)


def test_bad_records_are_located_or_counted(fmt, tmp_path, synth_dir):
    img = str(next((synth_dir / "media/train").glob("*.png")))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Yo."}],
            "images": [img]}
    bad = [
        {"messages": [{"role": "user", "content": "<image><image>Hi"}, {"role": "assistant", "content": "x"}],
         "images": [img]},
        {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "x"}],
         "images": ["missing.png"]},
        {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "x"}],
         "images": ["corrupt.png"]},
        {"messages": [{"role": "user", "content": "Hi " * 5000}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "x"}], "images": [3]},
        {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<image>x"}],
         "images": [img]},
        {"messages": [{"role": "user", "content": "<|image_pad|>Hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "x"}],
         "images": img},
        {"messages": [{"role": "user", "content": "<video>Hi"}, {"role": "assistant", "content": "x"}],
         "videos": [[img, img, "missing.png"]]},
    ]
    path = _write(tmp_path, [good] + bad)
    recs = read_records(path)
    reasons = ["placeholders", "media", "media", "too_long", "no_assistant", "format", "format", "placeholders",
               "format", "format", "media"]
    words = ["2 <image>", "not found", "cannot read image", "max_tokens", "no assistant", "path strings",
             "message 0 must be", r"message 1 \(assistant\) holds an <image>", r"contains <\|image_pad\|> in its text",
             "'images' must be a list", "image file not found"]
    assert len(reasons) == len(words) == len(bad)
    for rec, reason, words in zip(recs[1:], reasons, words):
        with pytest.raises(BadSample, match=words) as e:
            fmt.length(rec)  # found while measuring, before any training step
        with pytest.raises(BadSample, match=words):
            fmt.build(rec)
        assert e.value.reason == reason and f"{path}:line {recs.index(rec) + 1}" in str(e.value)
    with pytest.raises(BadSample, match="line 2"):
        ChatDataset(recs, fmt, on_bad_sample="error")
    ds = ChatDataset(recs, fmt, on_bad_sample="skip")
    assert ds.skipped == {"placeholders": 2, "media": 3, "too_long": 1, "no_assistant": 1, "format": 4}
    assert ds.lengths[0] is not None and ds.lengths[1:] == [None] * 11


def test_truncated_image_found_at_load_time_is_skipped(fmt, tmp_path, synth_dir):
    src = next((synth_dir / "media/train").glob("*.png")).read_bytes()
    (tmp_path / "trunc.png").write_bytes(src[: len(src) // 2])  # header intact, data cut
    rec = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "x"}],
           "images": ["trunc.png"]}
    ds = ChatDataset(read_records(_write(tmp_path, [rec])), fmt, on_bad_sample="skip")
    assert ds.lengths == [ds.lengths[0]] and ds.lengths[0] is not None
    assert ds.get(0) is None and ds.skipped == {"media": 1}


def test_sources_repeat_and_config_errors(tmp_path, synth_dir):
    data = DataConfig(train=[str(synth_dir / "train.jsonl"), {"path": str(synth_dir / "test.jsonl"), "repeat": 1.5}])
    assert len(load_records(data)) == 36 + 18
    as_paths = DataConfig(train=[synth_dir / "train.jsonl", {"path": synth_dir / "test.jsonl", "media_dir": synth_dir}])
    assert len(load_records(as_paths)) == 36 + 12  # pathlib paths work as well as strings
    with pytest.raises(ValueError, match="on_bad_sample"):
        DataConfig(on_bad_sample="ignore")
    with pytest.raises(ValueError, match="does not exist"):
        read_records(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_records(tmp_path / "x.json")
    line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    (tmp_path / "lines.json").write_text(f"{line}\n{line}\n")
    with pytest.raises(ValueError, match="name it .jsonl"):
        read_records(tmp_path / "lines.json")
    (tmp_path / "LINES.JSONL").write_text(f"{line}\n{line}\n")
    assert len(read_records(tmp_path / "LINES.JSONL")) == 2
    for name, text in (("e.jsonl", ""), ("e.json", "[]"), ("blank.json", "  \n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name} (holds no records|is empty)"):
            read_records(tmp_path / name)
    for train, words in (([{"path": None}], r"data.train\[0\].path must be a path"),
                         ([5], r"data.train\[0\] must be a path"),
                         ([{"path": str(tmp_path / "LINES.JSONL"), "repeat": "two"}], r"repeat must be a number")):
        with pytest.raises(ValueError, match=words):
            DataConfig(train=train)
    with pytest.raises(ValueError, match="relative paths are read from the working directory"):
        load_records(DataConfig(train=["no/such/file.jsonl"]))


def test_training_inputs_equal_the_inference_processor(fmt, synth_dir):
    """What the model is trained on is what `AutoProcessor` (the `infinitevl generate` path) feeds it."""
    import infinitevl  # noqa: F401  (registers the processor classes)
    from transformers import AutoProcessor

    from infinitevl.media import load_image, load_video

    proc = AutoProcessor.from_pretrained(str(TINY_ASSET))
    recs = read_records(synth_dir / "test.jsonl")
    for rec in (next(r for r in recs if r.images), next(r for r in recs if r.videos)):
        s, _ = fmt.prompt(rec)
        question = rec.messages[0]["content"].replace("<image>", "").replace("<video>", "")
        content = ([{"type": "image", "image": str(p)} for p in rec.images]
                   + [{"type": "video", "video": str(p)} for p in rec.videos] + [{"type": "text", "text": question}])
        text = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                        add_generation_prompt=True)
        kw, videos = {}, None
        if rec.videos:
            frames, kw["fps"] = load_video(str(rec.videos[0]), fps=2.0)
            videos = [frames]
        out = proc(text=[text], images=[load_image(str(p)) for p in rec.images] or None, videos=videos,
                   return_tensors="pt", **kw)
        assert out["input_ids"][0].tolist() == s.input_ids.tolist()
        for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            if getattr(s, k) is not None:
                torch.testing.assert_close(torch.as_tensor(out[k]).to(getattr(s, k).dtype), getattr(s, k))


def test_jsonl_errors_name_the_line_of_the_file(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    (tmp_path / "d.jsonl").write_text(f"{good}\n\n{good}\n{{\"messages\": [}}\n")
    with pytest.raises(ValueError, match=r"d.jsonl: line 4 is not valid JSON .*column"):
        read_records(tmp_path / "d.jsonl")
    (tmp_path / "b.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="UTF-8"):
        read_records(tmp_path / "b.json")


def test_sharegpt_records_read_as_messages(fmt, tmp_path):
    """LLaMA-Factory's other layout ({"conversations": [{"from", "value"}]}) builds the same sample."""
    ours = read_records(MEDIA / "mllm_demo.json")[0]
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    conv = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in ours.messages],
            "images": [str(p) for p in ours.images]}
    theirs = read_records(_write(tmp_path, [conv, {"conversations": [{"from": "robot", "value": "?"}]}]))
    assert theirs[0].messages == ours.messages
    a, b = fmt.build(ours), fmt.build(theirs[0])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    with pytest.raises(BadSample, match=r"d.jsonl:line 2.*message 0 must be"):
        fmt.build(theirs[1])


def test_patch_sizes_are_the_models():
    cfg = InfiniteVLConfig.from_file(TINY_ASSET)
    same = chat_format_for(TINY_ASSET, cfg, DataConfig(vision=VisionInputConfig(patch_size=cfg.vision.patch_size)))
    assert same.vision.cfg.merge_size == cfg.vision.spatial_merge_size  # left out: read from the model
    with pytest.raises(ValueError, match="data.vision.patch_size is 16 but the model's vision tower uses 14"):
        chat_format_for(TINY_ASSET, cfg, DataConfig(vision=VisionInputConfig(patch_size=16)))
    with pytest.raises(ValueError, match="data.vision.merge_size must be >= 1"):
        VisionInputConfig(merge_size=0)
