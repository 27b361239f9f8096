"""`infinitevl stream VIDEO --ask 30s:"What is happening?" [--ask 2m:"..."] [--fps 2] [--frame-size 448]`:
a video (file, directory of images, URL) streamed through a StreamSession in constant memory, questions
answered at their stream times, a live FPS/memory line on stderr."""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch


FRAME_SIZE = 448  # the published demo's frames: 256 visual tokens each
SHIPPED_FRAME_SIZE = 112  # the shipped tiny model's synthetic videos (tools/synthetic_task.py SIZE)


PROGRESS_EVERY = 500  # frames between progress lines when stderr is not a terminal


def parse_time(text: str) -> float:
    """'90', '30s', '2m', '1m30s', '1h2m3.5s' -> seconds."""
    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d*)?)h)?\s*(?:(\d+(?:\.\d*)?)m)?\s*(?:(\d+(?:\.\d*)?)s?)?\s*", text)
    if not text.strip() or m is None or not any(m.groups()):
        raise ValueError(f"cannot read {text!r} as a time: use seconds (90, 30s), minutes (2m) or both (1m30s)")
    h, mi, sec = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + sec


# a clock time before the question: H:MM:SS or M:SS (then the question follows the next colon)
_CLOCK = re.compile(r"\s*(?:(\d+):)?(\d+):([0-5]\d(?:\.\d*)?)\s*:(.*)", re.S)


def parse_ask(text: str) -> tuple[float, str]:
    """'30s:What is happening?' -> (30.0, 'What is happening?'); '1:30:Why?' and '1:02:03:Why?' are clock times
    (M:SS, H:MM:SS)."""
    if re.fullmatch(r"\s*(\d+:)*\d+(\.\d*)?\s*:?\s*", text):  # a time and nothing else (1:30, 0:01:05, 90:)
        raise ValueError(f"--ask {text!r} has no question after the time: write TIME:QUESTION, e.g. --ask "
                         "1:30:\"What is happening?\"")
    clock = _CLOCK.fullmatch(text)
    if clock is not None and clock.group(4).strip():
        h, m, sec = clock.group(1), clock.group(2), clock.group(3)
        return (int(h) * 3600 if h else 0) + int(m) * 60 + float(sec), clock.group(4).strip()
    when, sep, question = text.partition(":")
    if not sep or not question.strip():
        raise ValueError(f"--ask {text!r}: write TIME:QUESTION, e.g. --ask 30s:\"What is happening?\" (TIME: 90, "
                         "30s, 2m, 1m30s, 1:30)")
    bad_clock = re.match(r"\s*(\d+(?:\.\d*)?[hms]?)\s*:", question) if when.strip().isdigit() else None
    if bad_clock is not None:  # e.g. 1:5:Q or 0:90:Q, which would read as 1 s asking "5:Q"
        raise ValueError(f"--ask {text!r}: {when.strip()}:{bad_clock.group(1)} is not a clock time (M:SS or H:MM:SS, "
                         "with two-digit seconds 00-59): write e.g. 1:05:QUESTION or 65s:QUESTION")
    return parse_time(when), question.strip()


def _clock(seconds: float) -> str:
    m, s = divmod(seconds, 60)
    return f"{int(m)}:{s:04.1f}"


def stream_main(argv: list[str]) -> int:
    from .cli import HelpFormatter, _common, _device, _dtype, is_shipped, load_model, note_if_shipped, sampling_args

    ap = argparse.ArgumentParser(prog="infinitevl stream", description="Stream a video through the model in "
                                 "constant memory and answer questions at given stream times.",
                                 formatter_class=HelpFormatter)
    _common(ap)
    ap.add_argument("video", help="a video file, a directory of images, or a URL (rtsp://, http(s)://, /dev/videoN)")
    ap.add_argument("--ask", action="append", default=[], metavar='TIME:"QUESTION"',
                    help='a question at a stream time, e.g. 30s:"What is happening?" (repeatable; 90, 2m, 1m30s, 1:30, '
                         '1:02:03)')
    ap.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video")
    ap.add_argument("--frame-size", type=int, default=None,
                    help=f"frames are resized to SIZE x SIZE (a multiple of 28; default {FRAME_SIZE}, 256 tokens a "
                         f"frame; {SHIPPED_FRAME_SIZE} with the shipped model, the size it was trained on)")
    ap.add_argument("--keep", action="store_true", help="questions and answers join the stream's memory")
    ap.add_argument("--to-end", action="store_true",
                    help="read the video to its end even after the last question is answered (default: stop there)")
    ap.add_argument("--json", action="store_true", help="print answers as JSON lines")
    ap.add_argument("--quiet", action="store_true", help="no live FPS/memory line on stderr")
    ap.add_argument("--frames-per-step", type=int, default=1, metavar="K",
                    help="push K frames at a time (one step, larger kernels: more frames per second for files; each "
                         "answer still sees exactly the frames at or before its time)")
    ap.add_argument("--no-pipeline", action="store_true",
                    help="GPU: run each frame whole instead of its vision tower beside the previous frame's LLM part")
    args = ap.parse_args(argv)
    asks = sorted((parse_ask(a) for a in args.ask), key=lambda a: a[0])  # stable: same-time questions in order
    sampling = sampling_args(args)
    if not 0 < args.fps <= 1000:
        raise ValueError(f"--fps must be a number of frames per second in (0, 1000], got {args.fps}")
    if args.frames_per_step < 1:
        raise ValueError(f"--frames-per-step must be >= 1, got {args.frames_per_step}")
    if not asks:
        print("note: no --ask given: the video is streamed into the model's memory and nothing is asked "
              '(add e.g. --ask 30s:"What is happening?")', file=sys.stderr)

    from .inference.frames import FrameSpec
    from .inference.streaming import StreamSession
    from .inference.video_source import VideoSource

    if args.frame_size is None:
        args.frame_size = SHIPPED_FRAME_SIZE if is_shipped(args.model) else FRAME_SIZE
    spec = FrameSpec(height=args.frame_size, width=args.frame_size)
    source = VideoSource(args.video, fps=args.fps, size=(spec.height, spec.width))
    device = _device(args.device)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device, _dtype(args.dtype, device))
    note_if_shipped(args.model)
    session = StreamSession(model, tokenizer, frame=spec,
                            pipeline=False if args.no_pipeline else None)
    live = not args.quiet
    tty = sys.stderr.isatty()  # else (a log file) a plain progress line every PROGRESS_EVERY frames

    def answer(when: float, question: str, seen_until: float) -> None:
        text = session.ask(question, max_new_tokens=args.max_new_tokens, sampling=sampling, keep=args.keep)
        if live and tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps({"time": when, "seen_until": round(seen_until, 3), "question": question, "answer": text}),
                  flush=True)
        else:
            print(f"[{_clock(when)}] Q: {question}\n[{_clock(when)}] A: {text}", flush=True)

    t0, frames, last = time.perf_counter(), 0, 0.0
    pending: list = []  # frames waiting for a full clip of --frames-per-step

    def push(items) -> None:
        if len(items) == args.frames_per_step > 1:
            session.push_clip([f for f, _ in items], [t for _, t in items])
        else:  # single frames (and the rest of a clip cut short by a question)
            for f, t in items:
                session.push_frame(f, t)

    failure: list[Exception] = []

    def frames_until_failure():
        """The source's frames; a source that breaks after some frames ends the stream (the questions are then
        answered on what was seen and the error reported), one that gives none is the error itself."""
        try:
            yield from source
        except ValueError as e:
            if frames == 0:
                raise
            failure.append(e)

    def progress(ts: float) -> None:
        fps = frames / (time.perf_counter() - t0)
        gpu = f"  GPU {torch.cuda.memory_allocated() / 2**30:.2f} GiB" if device.startswith("cuda") else ""
        line = f"{_clock(ts)}  {frames} frames  {fps:.1f} FPS  memory {session.memory_bytes() / 2**20:.1f} MiB{gpu}"
        print(f"\r\033[K{line}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    for frame, ts in frames_until_failure():
        if asks and asks[0][0] < ts:  # a question due before this frame sees everything up to the last one
            push(pending)
            pending = []
        while asks and asks[0][0] < ts:
            answer(*asks.pop(0), seen_until=last)
        if args.ask and not asks and not args.to_end:  # every question answered: a live source would never end
            break
        pending.append((frame, ts))
        frames, last = frames + 1, ts
        if len(pending) == args.frames_per_step:
            push(pending)
            pending = []
        if live and not pending and (tty or frames % PROGRESS_EVERY == 0):  # frames in the memory, not waiting
            progress(ts)
    push(pending)
    if live and not tty and frames % PROGRESS_EVERY:
        progress(last)
    if frames == 0:
        raise ValueError(f"{args.video} gave no frames")
    for when, question in asks:  # at or after the end (or the source's failure): answered on all frames seen
        answer(when, question, seen_until=last)
    if live and tty:
        print(file=sys.stderr)
    if failure:
        seen = f"{frames} sampled frame{'s' if frames != 1 else ''}"
        print(f"error: {failure[0]} (the questions were answered on the {seen} before it)",
              file=sys.stderr)
        return 2
    return 0
