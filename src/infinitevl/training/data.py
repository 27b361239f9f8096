"""Chat records -> token ids, labels and vision inputs (the Qwen2.5-VL chat format).

A record (JSON list or JSONL; media paths relative to the file):
    {"messages": [{"role": "system"|"user"|"assistant", "content": "...<image>...<video>..."}],
     "images": ["a.jpg", ...], "videos": ["b.mp4" or ["f0.jpg", "f1.jpg", ...], ...]}
ShareGPT records ({"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}], ...}) are read too.
Each <image>/<video> placeholder takes the next entry of images/videos, in order, and becomes
<|vision_start|> + one pad token per merged patch + <|vision_end|>. The text follows the
Qwen2-VL chat template (a default system turn when none is given):
    <|im_start|>{role}\n{content}<|im_end|>\n
Only the assistant turns' "{content}<|im_end|>\n" are labelled (as LLaMA-Factory's qwen2_vl
template does). A bad record raises `BadSample` naming the file and record; the dataset's
`on_bad_sample` decides whether that stops training ("error") or is counted and skipped ("skip").
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..chat import STRUCTURAL
from .vision_inputs import MediaError, VisionInputConfig, VisionInputs, image_size, load_frames, load_image, probe_video

IGNORE = -100
PLACEHOLDER = re.compile(r"(<image>|<video>)")
ROLES = ("system", "user", "assistant")


class BadSample(ValueError):
    """A record that cannot become a correct training sample; `reason` is a short category."""

    def __init__(self, where: str, message: str, reason: str):
        super().__init__(f"{where}: {message}")
        self.where, self.message, self.reason = where, message, reason

    def __reduce__(self):  # crosses process boundaries (data.workers)
        return type(self), (self.where, self.message, self.reason)


@dataclass
class Sample:
    """One conversation, ready for the model. labels[t] = input_ids[t] on assistant tokens, else -100."""

    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long
    pixel_values: torch.Tensor | None = None  # [N, P]
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3]
    second_per_grid_ts: torch.Tensor | None = None  # [n_videos]
    where: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Record:
    messages: list[dict[str, str]]
    images: list[Path]
    videos: list[Path | list[Path]]
    where: str
    problem: str | None = None  # a structural defect found while reading (reported when the record is built)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _from_sharegpt(turns: list) -> list:
    """ShareGPT turns ({"from": "human"|"gpt"|"system", "value": ...}) as messages; a turn that is not one
    stays as it is, and the record check then names it."""
    return [{"role": _SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
            if isinstance(t, dict) and "from" in t else t for t in turns]


def read_records(path: str | Path, *, media_dir: str | Path | None = None) -> list[Record]:
    """Records of a JSON (list) or JSONL file; media paths resolved against `media_dir` or the file's folder."""
    path = Path(path)
    if not path.exists():
        rel = "" if path.is_absolute() else f" (relative paths are read from the working directory, {Path.cwd()})"
        raise ValueError(f"data file {path} does not exist{rel}: fix the path in the config")
    if not path.is_file():
        raise ValueError(f"data file {path} is not a file: give a .json or .jsonl file")
    base = Path(media_dir) if media_dir is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is not data
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read data file {path} ({e}): it must be UTF-8 JSON or JSONL text") from None
    jsonl = path.suffix.lower() == ".jsonl"
    if jsonl:
        raw = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    raw.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e.msg}, column {e.colno}): each line "
                                     "of a .jsonl file must be one whole record") from None
    else:
        if not text.strip():
            raise ValueError(f"data file {path} is empty: give it a JSON list of records")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            hint = (": it looks like one record per line, so name it .jsonl" if e.msg == "Extra data" else
                    ": a .json file holds one JSON list of records (one record per line is .jsonl)")
            raise ValueError(f"{path} is not valid JSON ({e}){hint}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of records (or use .jsonl, one record per line)")
        raw = list(enumerate(data))

    def resolve(p, nested=True):
        if isinstance(p, list) and nested:
            return [resolve(q, False) for q in p]
        if not isinstance(p, str):
            raise TypeError(f"media entries must be path strings (a video may be a list of frame paths), got {p!r}")
        return Path(p) if Path(p).is_absolute() else base / p

    records = []
    for i, r in raw:
        where = f"{path}:{'line' if jsonl else 'record'} {i + 1 if jsonl else i}"
        if isinstance(r, dict) and "messages" not in r and isinstance(r.get("conversations"), list):
            r = {**r, "messages": _from_sharegpt(r["conversations"])}
        if not isinstance(r, dict) or not isinstance(r.get("messages"), list):
            records.append(Record([], [], [], where, "a record must be {'messages': [...], 'images': [...], "
                                                     "'videos': [...]} (or ShareGPT: {'conversations': [{'from': "
                                                     "'human'|'gpt', 'value': ...}], ...})"))
            continue
        try:
            for key in ("images", "videos"):
                if not isinstance(r.get(key) or [], list):
                    raise TypeError(f"'{key}' must be a list of paths, got {type(r[key]).__name__} {r[key]!r:.60}")
            images = [resolve(p, False) for p in r.get("images") or []]
            videos = [resolve(p) for p in r.get("videos") or []]
        except TypeError as e:
            records.append(Record([], [], [], where, str(e)))
            continue
        records.append(Record(r["messages"], images, videos, where))
    if not records:
        raise ValueError(f"data file {path} holds no records")
    return records


@dataclass
class DataConfig:
    """Where the data is and how it becomes samples (shared by every stage)."""

    train: list[Any] = field(default_factory=list)  # paths, or {"path": ..., "repeat": 1.0, "media_dir": ...}
    max_tokens: int = 8192  # per sample (published cutoff_len 8096); longer samples are bad samples
    # packing budget per row (null: max_tokens); a longer sample (up to max_tokens) gets a row of its own, so
    # the longest row, what memory must hold, is max(row_tokens, max_tokens)
    row_tokens: int | None = None
    on_bad_sample: str = "error"  # "error": stop with the located error; "skip": count and skip
    system_prompt: str | None = "You are a helpful assistant."  # null or "": no default system turn
    vision: VisionInputConfig = field(default_factory=VisionInputConfig)
    cache: bool = False  # keep built samples in memory (small data sets)
    workers: int = 0  # processes that build the next steps' samples while the model trains (0: in the loop)

    def __post_init__(self):
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")
        if self.max_tokens < 8:
            raise ValueError(f"data.max_tokens must be >= 8, got {self.max_tokens}")
        if self.row_tokens is not None and self.row_tokens < 8:
            raise ValueError(f"data.row_tokens must be >= 8 (or null for data.max_tokens), got {self.row_tokens}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0 (0: samples are built in the training loop), got "
                             f"{self.workers}")
        if isinstance(self.vision, dict):
            self.vision = VisionInputConfig(**self.vision)
        for k, src in enumerate(self.train):
            source(src, k)


class ChatFormat:
    """Builds `Sample`s from records with a tokenizer and the model's special token ids."""

    def __init__(self, tokenizer, *, image_token_id: int, video_token_id: int, vision_start_token_id: int,
                 vision_end_token_id: int, vision: VisionInputs, system_prompt: str, max_tokens: int):
        self.tok = tokenizer
        self.image_id, self.video_id = image_token_id, video_token_id
        self.vstart, self.vend = vision_start_token_id, vision_end_token_id
        self.vision = vision
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        for t in ("<|im_start|>", "<|im_end|>"):
            if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id):
                raise ValueError(f"the tokenizer has no {t} token: use a Qwen2.5-VL tokenizer")

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _check(self, rec: Record) -> None:
        if rec.problem:
            raise BadSample(rec.where, rec.problem, "format")
        msgs = rec.messages
        if not msgs:
            raise BadSample(rec.where, "no messages (expected {'messages': [{'role': ..., 'content': ...}], ...})",
                            "format")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise BadSample(rec.where, f"message {j} must be {{'role': one of {ROLES}, 'content': str}}", "format")
        if not any(m["role"] == "assistant" for m in msgs):
            raise BadSample(rec.where, "no assistant message: nothing to learn from", "no_assistant")
        for j, m in enumerate(msgs):
            found = [t for t in STRUCTURAL if t in m["content"]]
            if found:
                raise BadSample(rec.where, f"message {j} contains {found[0]} in its text: the chat format writes "
                                "these tokens itself (give media as <image>/<video> placeholders)", "format")
            if m["role"] == "assistant" and PLACEHOLDER.search(m["content"]):
                raise BadSample(rec.where, f"message {j} (assistant) holds an <image>/<video> placeholder: media go "
                                "in user or system turns (the model reads them, it does not write them)",
                                "placeholders")
        n_img = sum(m["content"].count("<image>") for m in msgs)
        n_vid = sum(m["content"].count("<video>") for m in msgs)
        if n_img != len(rec.images) or n_vid != len(rec.videos):
            raise BadSample(
                rec.where, f"{n_img} <image> and {n_vid} <video> placeholders but {len(rec.images)} images and "
                f"{len(rec.videos)} videos: each placeholder takes one entry of images/videos", "placeholders")

    def _media_plan(self, rec: Record):
        """Per medium: ("image", path, grid) or ("video", path, grid, frame indices, sample fps)."""
        plan = []
        try:
            for p in rec.images:
                w, h = image_size(p)
                plan.append(("image", p, self.vision.image_grid(w, h)))
            for p in rec.videos:
                info = probe_video(p, self.vision.cfg.video_fps)
                idx, fps = self.vision.frame_plan(info.frames, info.fps)
                plan.append(("video", p, self.vision.video_grid(info.width, info.height, len(idx)), idx, fps))
        except MediaError as e:
            raise BadSample(rec.where, str(e), "media") from e
        return plan

    def _tokens(self, rec: Record, plan) -> tuple[list[int], list[int]]:
        images = iter([m for m in plan if m[0] == "image"])
        videos = iter([m for m in plan if m[0] == "video"])
        msgs = rec.messages
        if msgs[0]["role"] != "system" and self.system_prompt:
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        ids: list[int] = []
        labels: list[int] = []
        for m in msgs:
            head = self._encode(f"<|im_start|>{m['role']}\n")
            ids += head
            labels += [IGNORE] * len(head)
            body: list[int] = []
            for piece in PLACEHOLDER.split(m["content"]):
                if piece == "<image>":
                    body += [self.vstart] + [self.image_id] * self.vision.tokens(next(images)[2]) + [self.vend]
                elif piece == "<video>":
                    body += [self.vstart] + [self.video_id] * self.vision.tokens(next(videos)[2]) + [self.vend]
                else:
                    body += self._encode(piece)
            body += self._encode("<|im_end|>\n")
            ids += body
            labels += body if m["role"] == "assistant" else [IGNORE] * len(body)
        return ids, labels

    def prompt(self, rec: Record) -> tuple[Sample, str]:
        """The record up to its last assistant turn, ending with the generation header
        "<|im_start|>assistant\n" (for evaluation), and that turn's expected text."""
        self._check(rec)
        if rec.messages[-1]["role"] != "assistant":
            raise BadSample(rec.where, "the last message must be the assistant answer to evaluate", "format")
        head = Record(rec.messages[:-1], rec.images, rec.videos, rec.where)
        s = self.build(Record(head.messages + [{"role": "assistant", "content": ""}], rec.images, rec.videos,
                              rec.where))
        cut = len(s) - len(self._encode("<|im_end|>\n"))
        s.input_ids, s.labels = s.input_ids[:cut], s.labels[:cut]
        return s, rec.messages[-1]["content"]

    def length(self, rec: Record) -> int:
        """Token count without decoding any pixels; raises BadSample like `build`."""
        self._check(rec)
        n = len(self._tokens(rec, self._media_plan(rec))[0])
        self._check_length(rec, n)
        return n

    def _check_length(self, rec: Record, n: int) -> None:
        if n > self.max_tokens:
            raise BadSample(rec.where, f"{n} tokens > data.max_tokens={self.max_tokens}: raise max_tokens, or lower "
                            "the image/video pixel budget", "too_long")

    def build(self, rec: Record) -> Sample:
        self._check(rec)
        plan = self._media_plan(rec)
        ids, labels = self._tokens(rec, plan)
        self._check_length(rec, len(ids))
        s = Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), where=rec.where)
        try:
            imgs = [self.vision.image(load_image(m[1])) for m in plan if m[0] == "image"]
            vids = [self.vision.video(load_frames(m[1], m[3]), m[4]) for m in plan if m[0] == "video"]
        except MediaError as e:
            raise BadSample(rec.where, str(e), "media") from e
        for got, m in zip([g for _, g in imgs] + [g for _, g, _ in vids], plan):
            if tuple(got.tolist()) != tuple(m[2]):  # header size and decoded size disagree
                raise BadSample(rec.where, f"{m[1]} decoded to grid {got.tolist()} but its header says {m[2]}",
                                "media")
        if imgs:
            s.pixel_values = torch.cat([p for p, _ in imgs])
            s.image_grid_thw = torch.stack([g for _, g in imgs])
        if vids:
            s.pixel_values_videos = torch.cat([p for p, _, _ in vids])
            s.video_grid_thw = torch.stack([g for _, g, _ in vids])
            s.second_per_grid_ts = torch.tensor([t for _, _, t in vids], dtype=torch.float32)
        return s


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..model.checkpoint import require_tokenizer

    require_tokenizer(path)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json, whose model_type it may not know
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path} ({e}): the model directory needs tokenizer files "
                         f"(tokenizer.json, tokenizer_config.json)") from e
    finally:
        hf_logging.set_verbosity(level)


def chat_format_for(model_dir: str | Path, config, data: DataConfig) -> ChatFormat:
    """The ChatFormat for a checkpoint directory (its tokenizer) and a model config (its token ids)."""
    model_patches = {"patch_size": config.vision.patch_size, "merge_size": config.vision.spatial_merge_size,
                     "temporal_patch_size": config.vision.temporal_patch_size}
    for name, value in model_patches.items():
        given = getattr(data.vision, name)
        if given is not None and given != value:
            raise ValueError(f"data.vision.{name} is {given} but the model's vision tower uses {value}: leave it out "
                             f"(it is read from the model)")
    vc = dataclasses.replace(data.vision, **model_patches)
    return ChatFormat(
        load_tokenizer(model_dir), image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
        vision=VisionInputs(vc), system_prompt=data.system_prompt, max_tokens=data.max_tokens,
    )


class ChatDataset:
    """Records of one or more sources with their token lengths (measured once, without pixels).

    Bad records found while measuring are raised (on_bad_sample="error") or counted in `skipped` and
    left out of `lengths` (None). A record that only fails when its pixels are decoded is handled the
    same way by `get`, which then returns None."""

    def __init__(self, records: list[Record], fmt: ChatFormat, *, on_bad_sample: str = "error", cache: bool = False):
        self.records, self.fmt = records, fmt
        self.on_bad_sample, self.cache = on_bad_sample, cache
        self.skipped: dict[str, int] = {}
        self.skip_log: list[str] = []
        self._cache: dict[int, Sample] = {}
        self.lengths: list[int | None] = [self._measure(r) for r in records]
        if not any(n is not None for n in self.lengths):
            first = f"; the first: {self.skip_log[0]}" if self.skip_log else ""
            raise ValueError(f"no usable sample among {len(records)} records (skipped: {self.skipped}{first}): fix "
                             "the data")

    def __len__(self) -> int:
        return len(self.records)

    def _skip(self, e: BadSample) -> None:
        if self.on_bad_sample == "error":
            raise BadSample(e.where, f"{e.message} (or set data.on_bad_sample: skip to count and skip such records)",
                            e.reason) from e
        self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
        self.skip_log.append(str(e))

    def _measure(self, rec: Record) -> int | None:
        try:
            return self.fmt.length(rec)
        except BadSample as e:
            self._skip(e)
            return None

    def get(self, i: int) -> Sample | None:
        if i in self._cache:
            return self._cache[i]
        try:
            s = self.fmt.build(self.records[i])
        except BadSample as e:
            self._skip(e)
            return None
        assert len(s) == self.lengths[i], (len(s), self.lengths[i], s.where)
        if self.cache:
            self._cache[i] = s
        return s


def source(src: Any, k: int) -> dict[str, Any]:
    """data.train[k] as {path, repeat?, media_dir?}, checked."""
    if not isinstance(src, (str, os.PathLike, dict)):
        raise ValueError(f"data.train[{k}] must be a path or {{path, repeat, media_dir}}, got {src!r}")
    src = {"path": src} if isinstance(src, (str, os.PathLike)) else dict(src)
    unknown = set(src) - {"path", "repeat", "media_dir"}
    if unknown or "path" not in src:
        raise ValueError(f"data.train[{k}] must be a path or {{path, repeat, media_dir}}, got keys {sorted(src)}")
    for key in ("path", "media_dir"):
        if isinstance(src.get(key), os.PathLike):
            src[key] = os.fspath(src[key])
        if key in src and not (isinstance(src[key], str) and src[key]):
            raise ValueError(f"data.train[{k}].{key} must be a path, got {src[key]!r}")
    repeat = src.get("repeat", 1.0)
    if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not repeat >= 0:
        raise ValueError(f"data.train[{k}].repeat must be a number >= 0 (1 = once, 0.5 = a random half), got "
                         f"{repeat!r}")
    return src


def load_records(data: DataConfig, *, seed: int = 0) -> list[Record]:
    """All records of `data.train`, each source repeated `repeat` times (a fraction takes a seeded subset)."""
    import random

    if not data.train:
        raise ValueError("data.train is empty: list at least one JSON/JSONL file")
    out: list[Record] = []
    for k, src in enumerate(data.train):
        src = source(src, k)
        repeat = src.get("repeat", 1.0)
        recs = read_records(Path(src["path"]).expanduser(),
                            media_dir=Path(src["media_dir"]).expanduser() if "media_dir" in src else None)
        whole, frac = int(repeat), repeat - int(repeat)
        extra = random.Random(seed + k).sample(recs, round(frac * len(recs))) if frac else []
        out += recs * whole + extra
    return out
