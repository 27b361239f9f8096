"""`infinitevl stream` on the shipped tiny model and a real mp4: answers at their times, clear errors."""
import json

import pytest

from infinitevl.cli import main
from infinitevl.cli_stream import parse_ask, parse_time

from ..conftest import MEDIA


@pytest.mark.parametrize("text,seconds", [("90", 90), ("30s", 30), ("2m", 120), ("1m30s", 90), ("1h2m3.5s", 3723.5),
                                          ("0.5", 0.5)])
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


def test_parse_ask_and_bad_times():
    assert parse_ask("30s:What is happening? Really: now?") == (30.0, "What is happening? Really: now?")
    for bad in ("", "soon", "1x", "m", "-3s"):
        with pytest.raises(ValueError, match="as a time"):
            parse_time(bad)
    with pytest.raises(ValueError, match="TIME:QUESTION"):
        parse_ask("30s")
    # clock times: M:SS and H:MM:SS before the question
    assert parse_ask("1:30:What now?") == (90.0, "What now?")
    assert parse_ask("1:02:03.5:Why: really?") == (3723.5, "Why: really?")
    assert parse_ask("90:What now?") == (90.0, "What now?")
    for bad in ("1:30: ", "1:30", "0:01:05"):
        with pytest.raises(ValueError, match="no question after the time"):
            parse_ask(bad)
    for bad in ("1:5:What?", "0:90:Q", "1:30s:Q"):  # not clock times: refused, not read as "1 s: 5:What?"
        with pytest.raises(ValueError, match="is not a clock time"):
            parse_ask(bad)
    # a time with a unit is never a clock time: a question may start with a number and a colon
    assert parse_ask("30s:12:45 is on the clock, what next?") == (30.0, "12:45 is on the clock, what next?")
    assert parse_ask("1m30s:10:30 what?") == (90.0, "10:30 what?")


def test_stream_command_answers_at_times(capsys):
    rc = main(["stream", str(MEDIA / "1.mp4"), "--ask", "3s:What is happening?", "--ask", "1m30s:What colour is it?",
               "--fps", "2", "--frame-size", "56", "--max-new-tokens", "4", "--json"])
    assert rc == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert [(a["time"], a["question"]) for a in lines] == [(3.0, "What is happening?"), (90.0, "What colour is it?")]
    assert lines[0]["seen_until"] == 3.0 and 9.5 <= lines[1]["seen_until"] < 9.7  # the video ends at 9.7 s
    assert all(isinstance(a["answer"], str) for a in lines)
    assert "FPS" in err and "memory" in err and "20 frames" in err


def test_stream_command_errors(capsys, tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    assert main(["stream", str(tmp_path / "bad.mp4"), "--ask", "1s:Hi?"]) == 2
    assert main(["stream", str(MEDIA / "1.mp4"), "--ask", "later:Hi?"]) == 2
    assert main(["stream", str(MEDIA / "1.mp4"), "--frame-size", "30"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and "as a time" in err and "multiples of 28" in err


def test_stream_command_clips_answer_like_single_frames(capsys):
    """--frames-per-step 3: frames go in clips, cut short before a question, so every answer sees the frames it
    would see one by one (same answers, same last frame seen)."""
    argv = ["stream", str(MEDIA / "1.mp4"), "--ask", "3s:What is happening?", "--ask", "8s:What colour is it?",
            "--fps", "2", "--frame-size", "56", "--max-new-tokens", "6", "--json", "--quiet"]
    runs = []
    for k in ("1", "3"):
        assert main(argv + ["--frames-per-step", k]) == 0
        runs.append([json.loads(line) for line in capsys.readouterr().out.strip().splitlines()])
    assert runs[0] == runs[1] and [a["seen_until"] for a in runs[0]] == [3.0, 8.0]
    assert main(argv + ["--frames-per-step", "0"]) == 2
    assert "--frames-per-step must be >= 1" in capsys.readouterr().err


def test_a_source_that_breaks_midway_still_answers_every_question(capsys, monkeypatch):
    """A video that fails after some frames: the questions are answered on what was seen, then exit code 2."""
    from PIL import Image

    from infinitevl.inference import video_source
    from infinitevl.media import MediaError

    class Breaks:
        def __init__(self, *args, **kwargs):
            pass

        def __iter__(self):
            for i in range(4):
                yield Image.new("RGB", (56, 56), (40 * i, 0, 0)), i * 0.5
            raise MediaError("broken.mp4 ended after 4 of the 20 frames it announces")

    monkeypatch.setattr(video_source, "VideoSource", Breaks)
    rc = main(["stream", "broken.mp4", "--ask", "1s:First?", "--ask", "9s:Later?", "--frame-size", "56",
               "--max-new-tokens", "2", "--json", "--quiet"])
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert rc == 2 and [a["question"] for a in lines] == ["First?", "Later?"]
    assert lines[0]["seen_until"] == 1.0 and lines[1]["seen_until"] == 1.5
    assert "ended after 4" in err and "answered on the 4 sampled frames" in err


def test_no_question_is_a_note_not_silence(capsys):
    assert main(["stream", str(MEDIA / "3.mp4"), "--fps", "1", "--frame-size", "56", "--quiet"]) == 0
    assert "no --ask given" in capsys.readouterr().err


@pytest.mark.parametrize("to_end", [False, True])
def test_stream_stops_after_the_last_question_unless_to_end(capsys, monkeypatch, to_end):
    """A live source never ends: once every question is answered the command stops (--to-end reads on)."""
    from PIL import Image

    from infinitevl.inference import video_source

    read = []

    class Endless:
        def __init__(self, *args, **kwargs):
            pass

        def __iter__(self):
            for i in range(40):  # stands in for a camera
                read.append(i)
                yield Image.new("RGB", (56, 56), (5 * i, 0, 0)), i * 0.5

    monkeypatch.setattr(video_source, "VideoSource", Endless)
    argv = ["stream", "camera", "--ask", "2s:What now?", "--frame-size", "56", "--max-new-tokens", "2", "--json",
            "--quiet"] + (["--to-end"] if to_end else [])
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["seen_until"] == 2.0
    assert len(read) == (40 if to_end else 6)  # the frame at 2.5 s is read (it tells the question is due), not pushed


def test_frame_rates_that_are_not_one_are_refused(capsys):
    for fps in ("0", "-1", "inf", "1e308", "nan"):
        assert main(["stream", str(MEDIA / "1.mp4"), "--fps", fps, "--ask", "1s:What?"]) == 2
        assert "--fps must be a number of frames per second" in capsys.readouterr().err


def test_the_shipped_model_streams_at_its_training_size_by_default(capsys, monkeypatch):
    import infinitevl.inference.streaming as streaming

    sizes = []
    real = streaming.StreamSession.__init__

    def spy(self, model, tokenizer, *, frame, **kw):
        sizes.append((frame.height, frame.width))
        real(self, model, tokenizer, frame=frame, **kw)

    monkeypatch.setattr(streaming.StreamSession, "__init__", spy)
    assert main(["stream", str(MEDIA / "1.mp4"), "--fps", "1", "--ask", "2s:What?", "--max-new-tokens", "2",
                 "--quiet"]) == 0
    assert sizes == [(112, 112)]
