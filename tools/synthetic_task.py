"""The synthetic visual task the shipped tiny model is trained on.

Images (112x112, grey background) and short videos (8 frames at 2 fps, 112x112 mp4) with
questions whose answers are fixed sentences, so exact match scores them:

    shape     "What shape is in the image?"        -> "The shape is a star."
    colour    "What colour is the shape?"          -> "The colour is blue."
    count     "How many shapes are there?"         -> "There are three shapes."  (1..5)
    text      "What is written in the image?"      -> "The image says CAT."
    describe  "Describe the image."                -> "There is a red circle."
    video     "What did the first frame show?"     -> "The first frame showed a green cross."
              (the first two frames show one shape; six distractor frames follow, so with the
              tiny model's 64-token attention window the answer must come from the GDN memory)

    python tools/synthetic_task.py --out /tmp/synth --train 20000 --val 300 --test 600 [--seed 0] [--workers 8]

writes {train,val,test}.jsonl in the training-record format (media paths relative to the file)
and the media under media/. `example(task, rng)` gives one fresh (media, question, answer) in
memory, which the tests use.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 112
BACKGROUND = (128, 128, 128)
COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
    "purple": (140, 40, 180), "orange": (250, 140, 0), "white": (250, 250, 250), "black": (10, 10, 10),
}
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
WORDS = ["CAT", "DOG", "SUN", "BOX", "HAT", "PEN", "MAP", "JAR"]  # distinct first letters
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
TASKS = ("shape", "colour", "count", "text", "describe", "video")
QUESTIONS = {
    "shape": "What shape is in the image?", "colour": "What colour is the shape?",
    "count": "How many shapes are there?", "text": "What is written in the image?",
    "describe": "Describe the image.", "video": "What did the first frame show?",
}
VIDEO_FRAMES, VIDEO_FPS = 8, 2


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.35
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape}")


def canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    return img, ImageDraw.Draw(img)


def single_shape(rng: random.Random, shape: str, colour: str) -> Image.Image:
    """One large shape near the centre (a 64-wide ViT learns little position invariance from this much data)."""
    img, d = canvas()
    r = rng.uniform(30, 38)
    draw_shape(d, shape, SIZE / 2 + rng.uniform(-6, 6), SIZE / 2 + rng.uniform(-6, 6), r, COLOURS[colour])
    return img


def many_shapes(rng: random.Random, n: int, shape: str, colour: str) -> Image.Image:
    """n small shapes, each in its own cell of a 4x4 grid of 28-pixel cells (one LLM token per cell)."""
    img, d = canvas()
    cell = SIZE // 4
    for k in rng.sample(range(16), n):
        cx, cy = (k % 4 + 0.5) * cell + rng.uniform(-2, 2), (k // 4 + 0.5) * cell + rng.uniform(-2, 2)
        draw_shape(d, shape, cx, cy, 10, COLOURS[colour])
    return img


def word_image(rng: random.Random, word: str) -> Image.Image:
    """A word in large letters near the centre."""
    img, d = canvas()
    font = ImageFont.load_default(size=rng.randint(34, 38))
    colour = rng.choice(["white", "black", "yellow"])
    l, t, rgt, b = d.textbbox((0, 0), word, font=font)
    x = (SIZE - (rgt - l)) / 2 - l + rng.uniform(-4, 4)
    y = (SIZE - (b - t)) / 2 - t + rng.uniform(-4, 4)
    d.text((x, y), word, fill=COLOURS[colour], font=font)
    return img


@dataclass
class Example:
    task: str
    question: str
    answer: str
    image: Image.Image | None = None
    frames: list[Image.Image] | None = None


def example(task: str, rng: random.Random) -> Example:
    """One fresh example of `task` in memory."""
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    q = QUESTIONS[task]
    if task == "shape":
        return Example(task, q, f"The shape is a {shape}.", image=single_shape(rng, shape, colour))
    if task == "colour":
        return Example(task, q, f"The colour is {colour}.", image=single_shape(rng, shape, colour))
    if task == "describe":
        return Example(task, q, f"There is a {colour} {shape}.", image=single_shape(rng, shape, colour))
    if task == "count":
        n = rng.randint(1, 5)
        ans = "There is one shape." if n == 1 else f"There are {NUMBERS[n]} shapes."
        return Example(task, q, ans, image=many_shapes(rng, n, shape, colour))
    if task == "text":
        w = rng.choice(WORDS)
        return Example(task, q, f"The image says {w}.", image=word_image(rng, w))
    if task == "video":
        first = single_shape(rng, shape, colour)
        frames = [first, first]
        for _ in range(VIDEO_FRAMES - 2):
            s2 = rng.choice([s for s in SHAPES if s != shape])
            c2 = rng.choice([c for c in COLOURS if c != colour])
            frames.append(single_shape(rng, s2, c2))
        return Example(task, q, f"The first frame showed a {colour} {shape}.", frames=frames)
    raise ValueError(f"unknown task {task!r}: use one of {TASKS}")


def write_video(frames: list[Image.Image], path: Path, fps: int = VIDEO_FPS) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = SIZE, SIZE, "yuv420p"
        s.options = {"crf": "12"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.asarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def to_record(ex: Example, media_dir: Path, name: str, rel_to: Path) -> dict:
    media_dir.mkdir(parents=True, exist_ok=True)
    if ex.frames is not None:
        path = media_dir / f"{name}.mp4"
        write_video(ex.frames, path)
        tag, key = "<video>", "videos"
    else:
        path = media_dir / f"{name}.png"
        ex.image.save(path)
        tag, key = "<image>", "images"
    return {"messages": [{"role": "user", "content": tag + ex.question},
                         {"role": "assistant", "content": ex.answer}],
            key: [str(path.relative_to(rel_to))], "task": ex.task}


BLOCK = 250  # records per independently seeded block: the data do not depend on the number of workers


def _block(args) -> list[dict]:
    out, split, seed, first, n, tasks = args
    rng = random.Random(f"{split}-{seed}-{first // BLOCK}")
    return [to_record(example(tasks[i % len(tasks)], rng), out / "media" / split, f"{i:06d}", out)
            for i in range(first, first + n)]


def make_split(out: Path, split: str, n: int, seed: int, tasks=TASKS, workers: int = 1) -> list[dict]:
    jobs = [(out, split, seed, first, min(BLOCK, n - first), tasks) for first in range(0, n, BLOCK)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            blocks = pool.map(_block, jobs)
    else:
        blocks = [_block(j) for j in jobs]
    records = [r for b in blocks for r in b]
    random.Random(f"{split}-{seed}").shuffle(records)
    with open(out / f"{split}.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes drawing and encoding media")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("val", args.val), ("test", args.test)):
        if n:
            make_split(args.out, split, n, args.seed, workers=args.workers)
            print(f"{split}: {n} records -> {args.out / (split + '.jsonl')}")


if __name__ == "__main__":
    main()
