"""Command line: one dispatch dict of subcommand -> function (`COMMANDS`); `USAGE` is the top-level help."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .chat import TextStream

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-infinitevl"

USAGE = """usage: infinitevl COMMAND [options]   (infinitevl COMMAND --help for its options)

commands:
  generate   answer a prompt about images and videos
               infinitevl generate [--model DIR] [--image PATH ...] [--video PATH ...] --prompt "..."
               infinitevl generate --messages chat.json     (the model card's `messages` list, as JSON)
  stream     stream a video in constant memory, answering questions at given times
               infinitevl stream VIDEO --ask 30s:"What is happening?" [--ask 2m:"..."] [--fps 2]
  serve      answer over HTTP with OpenAI's chat completions API (JSON or server-sent events)
               infinitevl serve [--model DIR] [--port 8000] [--media-dir DIR]
  eval       exact-match accuracy of a checkpoint on a chat-format data file
               infinitevl eval --data test.jsonl [--model DIR] [--group-by task] [--out answers.jsonl]
  train      run one training stage
               infinitevl train {distill-layer,distill-e2e,sft,long-sft} --config configs/<stage>.yaml
  convert    turn a Qwen2.5-VL checkpoint into an InfiniteVL initialisation
               infinitevl convert --teacher QWEN2.5-VL-DIR --out STUDENT-DIR
  merge-lora merge a long-sft training checkpoint's LoRA adapters into a loadable checkpoint
               infinitevl merge-lora runs/long-sft/step-000500 --out DIR

With no --model, the small model shipped in the package answers (no network needed). It knows only a
synthetic world of shapes, colours, counts and words (images from tools/synthetic_task.py); give a released
checkpoint (--model DIR) for real photos and videos.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows each option's default (unless it has none worth showing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "(default" in text or not action.option_strings or d is None or d is False or d in ([], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _device(name: str) -> str:
    """--device as a device string, or a ValueError naming what is wrong and what to give instead."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    from .model.infinitevl import check_device

    return str(check_device(name))


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    from .model.infinitevl import check_dtype

    return check_dtype(name)


def load_model(model_dir: Path, device: str, dtype: torch.dtype, *, processor: bool = False):
    """(model, tokenizer) of a checkpoint directory, or (model, processor) with `processor`, checked cheaply first:
    its kind, then its tokenizer (whose vision-token ids must be the config's), then the weights."""
    from . import InfiniteVL
    from .model.checkpoint import check_tokenizer, require_tokenizer
    from .model.config import InfiniteVLConfig

    if Path(model_dir).is_file():
        raise ValueError(f"{model_dir} is a file: give the checkpoint directory (the folder holding config.json, the "
                         "weights and the tokenizer files)")
    config = InfiniteVLConfig.from_file(model_dir)
    require_tokenizer(model_dir)
    if processor:
        text = _processor(model_dir)
    else:
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(str(model_dir))
    check_tokenizer(text, config, model_dir)
    return InfiniteVL.from_pretrained(model_dir, dtype=dtype, device=device), text


def _processor(model_dir: Path):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load the processor from {model_dir} ({e}): a released checkpoint directory has "
                         "tokenizer.json, tokenizer_config.json and preprocessor_config.json beside its weights"
                         ) from None


def is_shipped(model_dir: Path) -> bool:
    return Path(model_dir).resolve() == DEFAULT_MODEL


# The shipped model saw video frames of at most 16384 pixels (configs/tiny: video_max_pixels, and the default
# video_min_pixels 56x56); qwen_vl_utils' video defaults would enlarge its 112x112 frames to 336x336.
SHIPPED_VIDEO_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 16384}


def shipped_video_sizes(messages: list[dict]) -> None:
    """For the shipped model: video items that set no size of their own (min_pixels, max_pixels, total_pixels,
    resized_*) get the pixel bounds it was trained with."""
    from .media import item_kind, vision_items

    own = ("min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width")
    for item in vision_items(messages):
        if item_kind(item) == "video" and not any(k in item for k in own):
            item.update(SHIPPED_VIDEO_PIXELS)


def note_if_shipped(model_dir: Path) -> None:
    """The shipped tiny model answers only about its synthetic world: say so, once, on stderr."""
    if is_shipped(model_dir):
        print("note: no --model given, so the small model shipped in the package answers. It knows only synthetic "
              f"shapes, colours, counts and words (try the images in {DEFAULT_MODEL.parent / 'examples'}); give --model "
              "DIR with a released checkpoint for real images and videos.", file=sys.stderr)


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                    help="checkpoint directory (default: the small model shipped in the package)")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: off)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for sampling")


def sampling_args(args):
    """The sampling options as SamplingParams, checked before any model is loaded."""
    from .inference import SamplingParams

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        params = SamplingParams(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise ValueError(f"{e} (--temperature, --top-k, --top-p)") from None
    if params.temperature == 0 and (params.top_k or params.top_p < 1):
        print("note: --top-k/--top-p apply only when sampling; with --temperature 0 the answer is greedy (give e.g. "
              "--temperature 0.7 to sample)", file=sys.stderr)
    return params


def cmd_generate(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="infinitevl generate", description="Answer a prompt about images/videos.",
                                 formatter_class=HelpFormatter)
    _common(ap)
    ap.add_argument("--image", type=str, action="append", default=[], help="image path (repeatable)")
    ap.add_argument("--video", type=str, action="append", default=[], help="video path (repeatable)")
    ap.add_argument("--fps", type=float, help="frames read per second of each --video (default 2; in --messages give "
                                               "\"fps\" in the video item)")
    ap.add_argument("--prompt", help="the question / instruction")
    ap.add_argument("--messages", help="a JSON file with a chat message list (the model card / qwen_vl_utils format)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of plain text")
    args = ap.parse_args(argv)
    if args.fps is not None and not (args.video and math.isfinite(args.fps) and 0 < args.fps <= 1000):
        ap.error(f"--fps must be a number in (0, 1000], got {args.fps}" if args.video else
                 "--fps applies to --video (in --messages, give \"fps\" in the video item)")
    if args.messages is not None:
        if args.prompt or args.image or args.video:
            ap.error("--messages replaces --prompt/--image/--video: give one or the other")
        messages = read_messages(Path(args.messages))
    elif not (args.prompt or "").strip():
        ap.error("give a non-empty --prompt (or --messages FILE)")
    else:
        content = [{"type": "image", "image": p} for p in args.image]
        content += [{"type": "video", "video": p, "fps": args.fps or 2.0} for p in args.video]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": args.prompt}]}]

    _note_placeholders(messages)
    if is_shipped(args.model):
        shipped_video_sizes(messages)
    args.sampling = sampling_args(args)
    device = _device(args.device)
    from .media import process_vision_info

    media = process_vision_info(messages, return_video_kwargs=True)  # bad media fail before the model loads
    torch.manual_seed(args.seed)
    model, processor = load_model(args.model, device, _dtype(args.dtype, device), processor=True)
    note_if_shipped(args.model)
    return _answer(model, processor, messages, media, args, device)


def read_messages(path: Path) -> list[dict]:
    """A messages JSON file (the model card's `messages`: one conversation), checked item by item. Media paths
    may be relative to the file's folder (else to the working directory) and may start with ~."""
    from .media import item_kind

    try:
        messages = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--messages {path}: cannot read a JSON chat message list ({e})") from None
    if isinstance(messages, list) and messages and all(isinstance(m, list) for m in messages):
        raise ValueError(f"--messages {path} holds {len(messages)} conversations: give one conversation per file "
                         "(a list of {'role', 'content'} messages)")
    records = messages if isinstance(messages, list) else [messages]
    if records and all(isinstance(r, dict) and ("messages" in r or "conversations" in r) for r in records):
        raise ValueError(f"--messages {path} looks like a training data file (records with 'messages' and media "
                         "lists): give one conversation, the model card's `messages` list of {'role', 'content'} "
                         "messages with {'type': 'image', 'image': PATH} items")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m
                                                                 for m in messages):
        raise ValueError(f"--messages {path}: expected a JSON list of {{'role', 'content'}} messages")
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(f"--messages {path}: message {i}'s content must be a string or a list of items")
        for j, item in enumerate(content):
            kind = item_kind(item) if isinstance(item, dict) else None
            where = f"--messages {path}: message {i}, item {j}"
            if kind is not None:
                key = kind if kind in item else "image_url" if "image_url" in item else None
                src = item.get(key) if key is not None else None
                if isinstance(src, str):
                    item[key] = _beside(src, path)
                elif isinstance(src, list):  # a video as its frames
                    item[key] = [_beside(f, path) if isinstance(f, str) else f for f in src]
                elif isinstance(src, dict) and isinstance(src.get("url"), str):  # {"image_url": {"url": ...}}
                    item[key] = {**src, "url": _beside(src["url"], path)}
            elif isinstance(item, dict) and item.get("type", "text" if "text" in item else None) == "text":
                if not isinstance(item.get("text"), str):
                    raise ValueError(f"{where}: a text item needs a string 'text', got {item.get('text')!r}")
            else:
                raise ValueError(f"{where}: unsupported item {item!r:.80} (the model reads text, image and video "
                                 "items)")
    last = messages[-1].get("content")
    said = last.strip() if isinstance(last, str) else [c for c in last if not isinstance(c, dict) or
                                                         item_kind(c) is not None or str(c.get("text", "")).strip()]
    if not said:
        raise ValueError(f"--messages {path}: the last message says nothing (empty content): give it text, an image "
                         "or a video to answer")
    return messages


def _beside(src: str, messages_file: Path) -> str:
    """A media path from a messages file: ~ expanded; a relative path is taken beside the file (as in training
    data files), else from the working directory. URLs and data URIs are kept as written."""
    if src.startswith(("http://", "https://", "data:")):
        return src
    local = Path(src.removeprefix("file://")).expanduser()
    beside = messages_file.parent / local
    if not local.is_absolute() and (beside.exists() or not local.exists()):
        local = beside
    return str(local)


def _note_placeholders(messages: list[dict]) -> None:
    """`<image>`/`<video>` written in the text (the training records' placeholders) are plain text in the chat
    format: say where media go instead."""
    texts = [m.get("content") for m in messages]
    texts = [t if isinstance(t, str) else " ".join(str(c.get("text", "")) for c in t if isinstance(c, dict))
             for t in texts if isinstance(t, (str, list))]
    found = sorted({p for p in ("<image>", "<video>") for t in texts if p in t})
    if found:
        print(f"note: {' and '.join(found)} in the text is read as plain text here; give media as --image/--video, "
              "or in --messages as {\"type\": \"image\", \"image\": PATH} items", file=sys.stderr)


def _answer(model, processor, messages: list[dict], media: tuple, args, device: str) -> int:
    """The same chat `messages` format as the library API and qwen_vl_utils: media decoded by
    infinitevl.media (`media` = its process_vision_info(messages, return_video_kwargs=True)), tokens expanded
    by the checkpoint's processor, answered by infinitevl.inference."""
    from .chat import chat_inputs
    from .inference.request import answer_stop_ids
    from .inference.engine import Engine

    input_ids, vision = chat_inputs(processor, messages, media, device)
    stops = answer_stop_ids(model, processor)
    # The engine is the fast path: fla kernels + the decode step in a CUDA graph on a GPU, eager on CPU.
    engine = Engine(model, max_batch_size=1)
    t0 = time.perf_counter()
    text = TextStream(processor.tokenizer)
    for col in engine.stream(input_ids, max_new_tokens=args.max_new_tokens, sampling=args.sampling,
                             stop_token_ids=stops, **vision):
        if int(col[0]) in stops:
            break
        new = text.push(int(col[0]))
        if not args.json:  # stream the answer as it is produced
            print(new, end="", flush=True)
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"answer": text.text(), "prompt_tokens": int(input_ids.shape[1]),
                          "new_tokens": len(text.tokens), "seconds": round(elapsed, 3)}))
    else:
        print(text.end())
    return 0


def cmd_train(argv: list[str]) -> int:
    from .cli_train import train_main

    return train_main(argv)


def cmd_convert(argv: list[str]) -> int:
    from .cli_train import convert_main

    return convert_main(argv)


def cmd_merge_lora(argv: list[str]) -> int:
    from .cli_train import merge_main

    return merge_main(argv)


def cmd_eval(argv: list[str]) -> int:
    from .cli_eval import eval_main

    return eval_main(argv)


def cmd_serve(argv: list[str]) -> int:
    from .server import serve_main

    return serve_main(argv)


def cmd_stream(argv: list[str]) -> int:
    from .cli_stream import stream_main

    return stream_main(argv)


COMMANDS = {
    "generate": cmd_generate,
    "stream": cmd_stream,
    "serve": cmd_serve,
    "eval": cmd_eval,
    "train": cmd_train,
    "convert": cmd_convert,
    "merge-lora": cmd_merge_lora,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        print(f"{USAGE}\ninfinitevl: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:]) or 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
