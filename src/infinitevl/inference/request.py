"""A generation request's arguments, checked once at the edge (`generate`, `Engine`): a ValueError naming the
argument and the fix, instead of an error deep inside the model or a silently ignored keyword.

The processor's output can be passed whole: `input_ids` and `attention_mask` are accepted under those names,
and `mm_token_type_ids` (which the model recomputes from the token ids) is dropped.
"""
from __future__ import annotations

import operator
from numbers import Integral

import torch

from ..model.infinitevl import VISION_KEYS, check_input_ids
from .sampling import SamplingParams

DROPPED = ("mm_token_type_ids",)


def prompt_inputs(input_ids_BT, attention_mask_BT, extra: dict) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(input ids [B, T], attention mask or None, vision inputs) from a call's arguments."""
    extra = dict(extra)
    for alias, value in (("input_ids", input_ids_BT), ("attention_mask", attention_mask_BT)):
        if alias in extra and value is not None:
            raise ValueError(f"{alias} given twice (as {alias} and {alias}_BT): pass it once")
    input_ids_BT = extra.pop("input_ids", input_ids_BT)
    attention_mask_BT = extra.pop("attention_mask", attention_mask_BT)
    for k in DROPPED:
        extra.pop(k, None)
    unknown = sorted(set(extra) - set(VISION_KEYS))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}: the vision inputs are {list(VISION_KEYS)}, the padding "
                         "mask is attention_mask (check the spelling)")
    for k, v in extra.items():
        if v is not None and not torch.is_tensor(v):
            raise ValueError(f"{k} must be a tensor (as the processor returns it with return_tensors='pt'), "
                             f"got {type(v).__name__}")
    if input_ids_BT is None:
        raise ValueError("no input_ids: pass the prompt's token ids, a [batch, tokens] integer tensor")
    check_input_ids(input_ids_BT)
    if attention_mask_BT is not None and (not torch.is_tensor(attention_mask_BT)
                                          or attention_mask_BT.shape != input_ids_BT.shape):
        shape = tuple(attention_mask_BT.shape) if torch.is_tensor(attention_mask_BT) else type(attention_mask_BT)
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids_BT.shape)}, "
                         f"got {shape}")
    input_ids_BT = input_ids_BT.long()
    if attention_mask_BT is not None:
        input_ids_BT, attention_mask_BT = left_padded(input_ids_BT, attention_mask_BT)
    return input_ids_BT, attention_mask_BT, extra


def left_padded(input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt with every row's padding moved to its front: generation continues from a row's last position,
    which must be its last real token. Right padding (the processor's default) and padding in the middle are
    moved; the real tokens keep their order, so the vision inputs still match. Pads change nothing in the state,
    so the result is what the row alone gives."""
    if attention_mask_BT.is_complex() or not bool(((attention_mask_BT == 0) | (attention_mask_BT == 1)).all()):
        raise ValueError("attention_mask must hold 1 for real tokens and 0 for padding, and nothing else")
    real = attention_mask_BT.bool()
    if not bool((real[:, :-1] & ~real[:, 1:]).any()):  # no pad after a real token: already left-padded
        return input_ids_BT, attention_mask_BT
    order = torch.sort(real.to(torch.int8), dim=1, stable=True).indices  # pads (0) first, each kind in order
    return input_ids_BT.gather(1, order), attention_mask_BT.gather(1, order)


def whole_number(value, name: str, low: int) -> int:
    """An int, a numpy integer or a one-element integer tensor, >= low."""
    try:
        if isinstance(value, bool) or (torch.is_tensor(value) and value.is_floating_point()):
            raise TypeError
        number = operator.index(value) if not torch.is_tensor(value) else int(value.item())
    except (TypeError, RuntimeError, ValueError):
        number = None
    if number is None or number < low or number >= 2**63:
        too_big = number is not None and number >= 2**63
        raise ValueError(f"{name} must be a whole number >= {low}" + (" (and < 2**63)" if too_big else "")
                         + f", got {value!r}")
    return number


def check_state(state, batch_size: int) -> None:
    """`state` (when given) must be an InferenceState of `batch_size` rows."""
    from ..model.state import InferenceState

    if state is None:
        return
    if not isinstance(state, InferenceState):
        raise ValueError(f"state must be an InferenceState (model.new_state(batch_size)), got {type(state).__name__}")
    if state.batch_size != batch_size:
        raise ValueError(f"state holds {state.batch_size} rows but the input has {batch_size}: make it with "
                         f"model.new_state({batch_size})")


def check_rows(attention_mask_BT) -> None:
    """Every row needs a real token: generation continues from a row's last one (a row of padding only would take
    its first token from a pad's logits, even when it continues a state)."""
    if attention_mask_BT is None:
        return
    empty = ~attention_mask_BT.bool().any(-1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"row(s) {rows} of attention_mask have no real token (all padding): drop those rows from the "
                         "batch")


def decode_options(pad_token_id, generator, on_token) -> int:
    """Checks generate's other options; returns the pad token id."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (or None), got {type(generator).__name__}")
    if on_token is not None and not callable(on_token):
        raise ValueError(f"on_token must be a function taking each new token column, got {type(on_token).__name__}")
    return whole_number(pad_token_id, "pad_token_id", 0)


def request_options(max_new_tokens, sampling, stop_token_ids, prefill_chunk_size) -> list[int]:
    """Checks the options; returns the stop token ids as a sorted list."""
    whole_number(max_new_tokens, "max_new_tokens", 1)
    if prefill_chunk_size is not None:
        whole_number(prefill_chunk_size, "prefill_chunk_size", 1)
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}: e.g. "
                         "SamplingParams(temperature=0.7, top_p=0.9)")
    if stop_token_ids is None:
        return []
    if isinstance(stop_token_ids, Integral) or (torch.is_tensor(stop_token_ids) and stop_token_ids.ndim == 0):
        stop_token_ids = [stop_token_ids]
    elif torch.is_tensor(stop_token_ids):
        stop_token_ids = stop_token_ids.reshape(-1).tolist()
    try:
        return sorted({whole_number(t, "a stop token id", 0) for t in stop_token_ids})
    except TypeError:
        raise ValueError(f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}") from None


def answer_stop_ids(model, tokenizer=None) -> list[int]:
    """The ids that end an answer: config.eos_token_id (one id or a list) and the tokenizer's <|im_end|>, the
    chat format's end of turn (a processor stands for its tokenizer)."""
    eos = model.config.eos_token_id
    stops = set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if tok is not None:
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end >= 0 and im_end != getattr(tok, "unk_token_id", None):
            stops.add(im_end)
    return sorted(stops)
