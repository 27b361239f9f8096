"""Build the small model shipped inside the package (src/infinitevl/assets/tiny-infinitevl/).

A released-format directory: config.json + model.safetensors (the `tiny` preset shape), a small
byte-level BPE tokenizer trained here with the `tokenizers` library on synthetic text and carrying
the Qwen2.5-VL special tokens, the Qwen2-VL chat template and an image-processor config.

    python tools/make_tiny_model.py [--out DIR] [--seed 0]

The weights are random unless `--weights` points at a trained checkpoint of the same shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from infinitevl import InfiniteVL, preset
from infinitevl.model.config import InfiniteVLConfig

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
VOCAB_SIZE = 1024  # BPE tokens + special tokens; the model's embedding has exactly this many rows

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 3136, "max_pixels": 448 * 448, "merge_size": 2, "patch_size": 14, "temporal_patch_size": 2,
    "resample": 3, "rescale_factor": 0.00392156862745098,
}

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "cyan"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
QUESTIONS = [
    "What shape is in the image?", "What colour is the shape?", "How many shapes are there?",
    "What is written in the image?", "What did the first frame show?", "Describe the image.",
    "What is happening in the video?", "Who are they?", "What are they doing?", "Please describe this image",
]


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = ["You are a helpful assistant.", "system", "user", "assistant"] + QUESTIONS
    for _ in range(n):
        s, c, k = rng.choice(SHAPES), rng.choice(COLOURS), rng.randrange(11)
        lines.append(rng.choice([
            f"There is a {c} {s}.", f"The shape is a {s}.", f"The colour is {c}.", f"There are {NUMBERS[k]} shapes.",
            f"There are {k} {c} {s}s.", f"The image says {''.join(rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ') for _ in range(3))}.",
            f"The first frame showed a {c} {s}.", f"A {c} {s} and a {rng.choice(COLOURS)} {rng.choice(SHAPES)}.",
        ]))
    return lines


def build_tokenizer(seed: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(20000, seed), trainer=trainer)
    if tok.get_vocab_size() > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens > {VOCAB_SIZE}")
    return tok


def tiny_config(tok: Tokenizer) -> InfiniteVLConfig:
    cfg = preset("tiny")
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return dataclasses.replace(
        cfg,
        text=dataclasses.replace(cfg.text, vocab_size=VOCAB_SIZE, sliding_window=64),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
    )


def write_tokenizer_files(tok: Tokenizer, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace", "model_max_length": 32768,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
        "processor_class": "Qwen2_5_VLProcessor",
    }, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/infinitevl/assets/tiny-infinitevl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=Path, default=None, help="a trained checkpoint directory of the same shape")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    tok = build_tokenizer(args.seed)
    cfg = tiny_config(tok)
    model = InfiniteVL.from_pretrained(args.weights) if args.weights else InfiniteVL(cfg)
    if model.config != cfg:
        raise SystemExit("--weights has a different config than the tiny model")
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    write_tokenizer_files(tok, tmp)
    (tmp / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.bos_token_id, "do_sample": False}, indent=2) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params)")


if __name__ == "__main__":
    main()
