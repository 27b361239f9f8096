"""`infinitevl generate`: the README's run command (shipped model, no network), media, messages files, errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from infinitevl import cli

from .conftest import MEDIA


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_with_shipped_model_image(capsys):
    rc, out, _ = _run(["generate", "--image", str(MEDIA / "1.jpg"), "--prompt", "Describe the image.",
                       "--max-new-tokens", "4", "--json"], capsys)
    assert rc == 0
    line = json.loads(out.strip().splitlines()[-1])
    assert line["prompt_tokens"] > 20 and 1 <= line["new_tokens"] <= 4


def test_generate_video_and_two_images(capsys):
    rc, out, _ = _run(["generate", "--image", str(MEDIA / "2.jpg"), "--image", str(MEDIA / "3.jpg"),
                       "--video", str(MEDIA / "1.mp4"), "--fps", "1", "--prompt", "What changed?",
                       "--max-new-tokens", "2", "--json"], capsys)
    assert rc == 0
    one = json.loads(out.strip().splitlines()[-1])
    rc, out, _ = _run(["generate", "--image", str(MEDIA / "2.jpg"), "--prompt", "What changed?",
                       "--max-new-tokens", "2", "--json"], capsys)
    assert one["prompt_tokens"] > json.loads(out.strip().splitlines()[-1])["prompt_tokens"]


def test_messages_file_equals_flags(tmp_path, capsys):
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(MEDIA / "1.jpg")},
                                         {"type": "text", "text": "Describe the image."}]}]
    (tmp_path / "m.json").write_text(json.dumps(msgs))
    rc, a, _ = _run(["generate", "--messages", str(tmp_path / "m.json"), "--max-new-tokens", "5", "--json"], capsys)
    rc2, b, _ = _run(["generate", "--image", str(MEDIA / "1.jpg"), "--prompt", "Describe the image.",
                      "--max-new-tokens", "5", "--json"], capsys)
    a, b = json.loads(a.strip()), json.loads(b.strip())
    assert rc == rc2 == 0 and (a["answer"], a["prompt_tokens"]) == (b["answer"], b["prompt_tokens"])


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    rc, _, err = _run(["generate", "--image", str(bad), "--prompt", "hi"], capsys)
    assert rc == 2 and "broken.jpg" in err
    rc, _, err = _run(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"], capsys)
    assert rc == 2 and "nowhere" in err
    (tmp_path / "m.json").write_text("{not json")
    rc, _, err = _run(["generate", "--messages", str(tmp_path / "m.json")], capsys)
    assert rc == 2 and "m.json" in err
    with pytest.raises(SystemExit):
        cli.main(["generate"])  # neither --prompt nor --messages: argparse usage error
    assert cli.main(["frobnicate"]) == 2


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "infinitevl.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout


def test_the_shipped_example_is_answered_and_the_tiny_model_says_what_it_knows(capsys):
    """The README's run command: the shipped synthetic example, a clean answer, a note on stderr."""
    example = cli.DEFAULT_MODEL.parent / "examples" / "blue_star.png"
    rc, out, err = _run(["generate", "--image", str(example), "--prompt", "Describe the image.", "--json"], capsys)
    assert rc == 0 and json.loads(out)["answer"] == "There is a blue star."
    assert "synthetic" in err and "--model" in err


def test_device_errors_and_empty_prompts(capsys, monkeypatch):
    rc, _, err = _run(["generate", "--device", "gpu", "--prompt", "hi"], capsys)
    assert rc == 2 and "unknown device 'gpu'" in err
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    rc, _, err = _run(["generate", "--device", "cuda", "--prompt", "hi"], capsys)
    assert rc == 2 and "no CUDA GPU" in err and "cpu" in err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "   "])
    assert "non-empty --prompt" in capsys.readouterr().err
    for flags, message in ((["--temperature", "nan"], "finite"), (["--top-p", "1.5"], "top_p"),
                           (["--max-new-tokens", "0"], "--max-new-tokens")):
        rc, _, err = _run(["generate", "--prompt", "hi", *flags], capsys)
        assert rc == 2 and message in err and "note:" not in err  # refused before the model loads


def test_model_directories_that_cannot_answer(tmp_path, capsys):
    import shutil

    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy2(cli.DEFAULT_MODEL / name, tmp_path / name)  # no tokenizer files
    rc, _, err = _run(["generate", "--model", str(tmp_path), "--prompt", "hi"], capsys)
    assert rc == 2 and "no tokenizer files" in err
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="qwen2_5_vl")))
    rc, _, err = _run(["generate", "--model", str(tmp_path), "--prompt", "hi"], capsys)
    assert rc == 2 and "infinitevl convert" in err


def test_a_tokenizer_of_another_model_and_bad_media_fail_before_the_weights_load(tmp_path, capsys, monkeypatch):
    import shutil

    from .conftest import FIXTURES

    for f in (FIXTURES / "reference-tiny" / "model").iterdir():  # vision tokens at 1001..1004
        shutil.copy2(f, tmp_path / f.name)
    for f in cli.DEFAULT_MODEL.iterdir():  # the shipped tokenizer: vision tokens at 9..13
        if "token" in f.name or f.name == "preprocessor_config.json":
            shutil.copy2(f, tmp_path / f.name)

    def no_weights(*a, **k):
        raise AssertionError("the weights were read")

    monkeypatch.setattr("infinitevl.InfiniteVL.from_pretrained", no_weights)
    rc, _, err = _run(["generate", "--model", str(tmp_path), "--prompt", "hi"], capsys)
    assert rc == 2 and "does not belong to this model (<|image_pad|> is 12 in the tokenizer, 1001" in err
    rc, _, err = _run(["generate", "--image", str(tmp_path / "missing.png"), "--prompt", "hi"], capsys)
    assert rc == 2 and "image file not found" in err and "note:" not in err


def test_help_and_unknown_commands(capsys):
    assert cli.main(["--help"]) == 0
    assert "commands:" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "(default: 64)" in out and "(default: auto)" in out


def test_placeholders_in_the_text_get_a_note(capsys):
    rc, _, err = _run(["generate", "--prompt", "<image> What is it?", "--max-new-tokens", "1"], capsys)
    assert rc == 0 and "<image> in the text is read as plain text" in err


def test_messages_files_are_checked_item_by_item(tmp_path, capsys):
    import shutil

    shutil.copy2(MEDIA / "1.jpg", tmp_path / "photo.jpg")
    cases = {
        "audio.json": ([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}], "unsupported item"),
        "number.json": ([{"role": "user", "content": [{"type": "text", "text": 42}]}], "needs a string 'text'"),
        "two.json": ([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], "one conversation"),
    }
    for name, (messages, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(messages))
        rc, _, err = _run(["generate", "--messages", str(tmp_path / name)], capsys)
        assert rc == 2 and message in err and name in err
    # a path relative to the messages file (run from elsewhere) is found
    (tmp_path / "rel.json").write_text(json.dumps([{"role": "user", "content": [
        {"type": "image", "image": "photo.jpg"}, {"type": "text", "text": "Describe the image."}]}]))
    rc, out, _ = _run(["generate", "--messages", str(tmp_path / "rel.json"), "--max-new-tokens", "2", "--json"], capsys)
    assert rc == 0 and json.loads(out)["prompt_tokens"] > 20


def test_messages_file_paths_resolve_beside_the_file(tmp_path, capsys, monkeypatch):
    import shutil

    for name in ("1.jpg", "2.jpg", "3.jpg"):  # frames of one video have one size
        shutil.copy2(MEDIA / "1.jpg", tmp_path / name)
    messages = [{"role": "user", "content": [
        {"type": "video", "video": ["1.jpg", "2.jpg", "3.jpg", "2.jpg"]},
        {"type": "image_url", "image_url": {"url": "3.jpg"}},
        {"type": "image", "image": "https://example.com/x.png"},
        {"type": "text", "text": "What changes?"}]}]
    (tmp_path / "frames.json").write_text(json.dumps(messages))
    monkeypatch.chdir(tmp_path.parent)  # run from elsewhere
    content = cli.read_messages(tmp_path / "frames.json")[0]["content"]
    assert content[0]["video"] == [str(tmp_path / n) for n in ("1.jpg", "2.jpg", "3.jpg", "2.jpg")]
    assert content[1]["image_url"] == {"url": str(tmp_path / "3.jpg")}
    assert content[2]["image"] == "https://example.com/x.png"  # URLs are kept as written
    messages[0]["content"] = messages[0]["content"][:2] + messages[0]["content"][3:]
    (tmp_path / "frames.json").write_text(json.dumps(messages))
    rc, out, err = _run(["generate", "--messages", str(tmp_path / "frames.json"), "--max-new-tokens", "2",
                         "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["prompt_tokens"] > 40


def test_the_shipped_model_reads_videos_at_the_size_it_was_trained_on(tmp_path, capsys):
    """qwen_vl_utils' video defaults would enlarge the synthetic 112x112 frames to 336x336, which the shipped model
    never saw: `generate --video` gives it its training sizes and it recalls the first frame."""
    import random

    from .training.conftest import synthetic_task

    st = synthetic_task()
    rng = random.Random("cli-video-sizes")
    right = 0
    for i in range(3):
        ex = st.example("video", rng)
        path = tmp_path / f"{i}.mp4"
        st.write_video(ex.frames, path)
        rc, out, err = _run(["generate", "--video", str(path), "--prompt", ex.question, "--json"], capsys)
        assert rc == 0, err
        right += json.loads(out)["answer"] == ex.answer
    assert right >= 2


def test_shipped_video_sizes_only_fill_items_without_a_size_of_their_own():
    items = [{"type": "video", "video": "a.mp4"}, {"type": "video", "video": "b.mp4", "min_pixels": 50000},
             {"type": "video", "video": "c.mp4", "resized_height": 56, "resized_width": 56}]
    cli.shipped_video_sizes([{"role": "user", "content": items}])
    assert items[0] == {"type": "video", "video": "a.mp4", **cli.SHIPPED_VIDEO_PIXELS}
    assert "max_pixels" not in items[1] and "min_pixels" not in items[2]


def test_messages_paths_beside_the_file_win_over_the_working_directory(tmp_path, monkeypatch):
    import shutil

    (tmp_path / "chat").mkdir()
    shutil.copy2(MEDIA / "1.jpg", tmp_path / "chat" / "a.jpg")
    shutil.copy2(MEDIA / "2.jpg", tmp_path / "a.jpg")  # another picture of the same name, in the working directory
    (tmp_path / "chat" / "m.json").write_text(json.dumps([{"role": "user", "content": [
        {"type": "image", "image": "a.jpg"}, {"type": "image", "image": "2.jpg"}, {"type": "text", "text": "?"}]}]))
    shutil.copy2(MEDIA / "2.jpg", tmp_path / "2.jpg")
    monkeypatch.chdir(tmp_path)
    content = cli.read_messages(tmp_path / "chat" / "m.json")[0]["content"]
    assert content[0]["image"] == str(tmp_path / "chat" / "a.jpg")
    assert content[1]["image"] == "2.jpg"  # not beside the file: from the working directory


def test_fps_and_device_options_are_checked(capsys):
    for flags, message in ((["--video", "x.mp4", "--fps", "nan"], "--fps must be a number in (0, 1000]"),
                           (["--video", "x.mp4", "--fps", "0"], "--fps must be"),
                           (["--fps", "2"], "--fps applies to --video")):
        with pytest.raises(SystemExit):
            cli.main(["generate", "--prompt", "hi", *flags])
        assert message in capsys.readouterr().err
    rc, _, err = _run(["generate", "--device", "meta", "--prompt", "hi"], capsys)
    assert rc == 2 and "cpu, cuda (cuda:N) or mps" in err
    rc, _, err = _run(["generate", "--top-p", "0.5", "--prompt", "hi", "--max-new-tokens", "1"], capsys)
    assert rc == 0 and "--top-k/--top-p apply only when sampling" in err


def test_streamed_text_never_shows_half_a_character():
    from transformers import AutoTokenizer

    from .conftest import QWEN_TOKENIZER

    tok = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    sentence = "Voilà: 🌟 中文 ok"
    ids = tok(sentence, add_special_tokens=False)["input_ids"]
    stream = cli.TextStream(tok)
    parts = [stream.push(i) for i in ids] + [stream.end()]
    assert "".join(parts) == sentence and not any("\ufffd" in p for p in parts)
    assert len(ids) > len([p for p in parts if p])  # the emoji's bytes span tokens: one was held back


def test_messages_and_paths_of_the_wrong_kind(tmp_path, capsys):
    (tmp_path / "empty.json").write_text(json.dumps([{"role": "user", "content": [{"type": "text", "text": " "}]}]))
    rc, _, err = _run(["generate", "--messages", str(tmp_path / "empty.json")], capsys)
    assert rc == 2 and "the last message says nothing" in err
    rc, _, err = _run(["generate", "--messages", str(MEDIA / "mllm_demo.json")], capsys)
    assert rc == 2 and "looks like a training data file" in err
    rc, _, err = _run(["generate", "--model", str(MEDIA / "1.jpg"), "--prompt", "hi"], capsys)
    assert rc == 2 and "is a file: give the checkpoint directory" in err
    rc, _, err = _run(["generate", "--image", str(tmp_path), "--prompt", "hi"], capsys)
    assert rc == 2 and "is a directory, not an image file" in err
