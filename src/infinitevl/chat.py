"""One chat turn, shared by `infinitevl generate` and `infinitevl serve`: the model card's `messages` -> the
model's inputs (media decoded by `infinitevl.media`, tokens expanded by the checkpoint's processor), the
chat-format tokens a message's text must not hold (`STRUCTURAL`), and `TextStream` (new token ids -> the
printable text they add)."""
from __future__ import annotations

import torch

from .model.infinitevl import VISION_KEYS


# tokens the chat format itself writes: in a message's text they would break the turns or the media count
STRUCTURAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
              "<|vision_pad|>", "<|endoftext|>")


def chat_inputs(processor, messages: list[dict], media: tuple, device) -> tuple[torch.Tensor, dict]:
    """(input_ids [1, T], vision inputs on `device`) for one conversation ending in a user turn.
    `media` = `infinitevl.media.process_vision_info(messages, return_video_kwargs=True)`."""
    images, videos, video_kwargs = media
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, videos=videos, return_tensors="pt", **video_kwargs)
    vision = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items() if k in VISION_KEYS}
    return inputs["input_ids"], vision


class TextStream:
    """Token ids in, printable text out: `push` returns what is new. A character whose bytes span several tokens
    decodes to U+FFFD until its last token arrives, so it is held back until then."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = ""

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()

    def push(self, token: int) -> str:
        self.tokens.append(token)
        so_far = self.text().rstrip("\ufffd")
        if not so_far.startswith(self.shown):  # the decoding of earlier tokens changed: wait for the end
            return ""
        new, self.shown = so_far[len(self.shown):], so_far
        return new

    def end(self) -> str:
        """The rest of the text (a held-back character, or all of it again if earlier output was revised)."""
        full = self.text()
        return full[len(self.shown):] if full.startswith(self.shown) else "\n" + full
