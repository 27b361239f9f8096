"""The edge to transformers: config, `PreTrainedModel` + `GenerationMixin` wrapper, Auto* registration.

Legend: B batch, T tokens, V vocabulary.

After `import infinitevl`, the released model card works without trust_remote_code:

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, device_map="auto")
    processor = AutoProcessor.from_pretrained(path)
    ...
    generated_ids = model.generate(**inputs, max_new_tokens=128)

The wrapper owns nothing of its own: its `visual`, `model` and `lm_head` are the core `InfiniteVL`'s modules
(so state-dict keys are the released names) and `.core` is the core model. Loading goes through
`InfiniteVL.from_pretrained`. Between `generate` steps the "cache" is the core's constant-size
`InferenceState`, wrapped in `InferenceStateCache` (a transformers `Cache`); the prompt (with its images and
videos) is consumed once, then one token per step with its attention-mask column.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .model.config import InfiniteVLConfig, TextConfig, VisionConfig, preset
from .model.infinitevl import VISION_KEYS, InfiniteVL, check_input_ids
from .inference.request import check_rows, left_padded
from .model.state import InferenceState

# What generate() calls the cache in its model inputs and outputs: `cache` from transformers 5.24,
# `past_key_values` before. forward and prepare_inputs_for_generation accept both names.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

MODEL_TYPE = "infinite_vl"
_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "eos_token_id",
                 "bos_token_id")
# Keys handled by PretrainedConfig itself rather than by the model description.
_HF_CONFIG_KEYS = {"dtype", "torch_dtype", "name_or_path", "_name_or_path", "return_dict", "output_hidden_states",
                   "output_attentions", "architectures", "transformers_version", "id2label", "label2id",
                   "problem_type", "num_labels", "chunk_size_feed_forward", "is_encoder_decoder", "_commit_hash"}
# Released files carry these; they do not describe our model (we pick kernels ourselves, the state is always kept).
_DROPPED_CONFIG_KEYS = {"attn_implementation", "_attn_implementation", "_attn_implementation_internal", "use_cache",
                        "auto_map", "_from_model_config"}
# from_pretrained arguments that are accepted and have nothing to do here.
_IGNORED_LOAD_KWARGS = {"attn_implementation", "trust_remote_code", "low_cpu_mem_usage", "use_safetensors",
                        "_from_auto", "_from_pipeline", "force_download", "proxies", "local_files_only", "token",
                        "revision", "cache_dir", "subfolder", "resume_download", "use_auth_token", "code_revision",
                        "offload_state_dict", "offload_folder", "weights_only", "key_mapping", "adapter_kwargs",
                        "tp_plan", "tp_size", "distributed_config", "output_loading_info", "experts_implementation"}


# from_pretrained keywords that set the transformers config (not the checkpoint's description)
_RUN_SETTINGS = {"pad_token_id", "use_cache"}
# ... and keys that describe the checkpoint: they come from its config.json only
_CHECKPOINT_KEYS = {f.name for f in dataclasses.fields(TextConfig)} | set(_TOKEN_FIELDS) | {"vision_config",
                                                                                           "text_config"}


def _differences(given: dict, found: dict, prefix: str = "") -> list[str]:
    """'key: given -> found' for every leaf that differs between two config dicts."""
    out = []
    for k in sorted(set(given) | set(found)):
        a, b = given.get(k), found.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# ---- config ----
class InfiniteVLHFConfig(PretrainedConfig):
    """transformers view of `InfiniteVLConfig`: reads and writes the released config.json (flat text fields
    and a nested `vision_config`, or a nested `text_config`); the text fields are attributes, as in the file."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs: Any):
        hf = {k: kwargs.pop(k) for k in list(kwargs) if k in _HF_CONFIG_KEYS}
        for k in _DROPPED_CONFIG_KEYS:
            kwargs.pop(k, None)
        pad_token_id = kwargs.pop("pad_token_id", None)
        if "vision_config" in kwargs:
            core = InfiniteVLConfig.from_dict(kwargs)  # validates every key, model_type included
        elif set(kwargs) <= {"model_type"}:
            core = preset("4b")
        else:
            raise ValueError(
                f"an InfiniteVL config needs a vision_config (got keys {sorted(kwargs)}): load a released config.json "
                f"or build one with InfiniteVLHFConfig.from_core(infinitevl.preset(...))"
            )
        super().__init__(**hf)
        for f in dataclasses.fields(TextConfig):
            setattr(self, f.name, getattr(core.text, f.name))
        self.vision_config = dataclasses.asdict(core.vision)
        for name in _TOKEN_FIELDS:
            setattr(self, name, getattr(core, name))
        self.pad_token_id = pad_token_id
        self.use_cache = True

    @classmethod
    def from_core(cls, core: InfiniteVLConfig, **kwargs: Any) -> "InfiniteVLHFConfig":
        return cls(**core.to_dict(), **kwargs)

    def to_core(self) -> InfiniteVLConfig:
        """Our dataclass config, rebuilt from the attributes (so edits to the attributes are validated here)."""
        text = TextConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TextConfig)})
        vision = VisionConfig(**self.vision_config)
        return InfiniteVLConfig(text=text, vision=vision, **{k: getattr(self, k) for k in _TOKEN_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        out = self.to_core().to_dict()
        if self.pad_token_id is not None:
            out["pad_token_id"] = self.pad_token_id
        if self.dtype is not None:
            out["dtype"] = str(self.dtype).removeprefix("torch.")
        import transformers

        out["transformers_version"] = transformers.__version__
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        # A diff against the default (the 4B shape) would drop fields config.json must have: write them all.
        return self.to_dict()


# ---- the state as a transformers Cache ----
class InferenceStateCache(Cache):
    """The model's `InferenceState` in the place generate() keeps `past_key_values`. Allocated on the first
    forward; `columns` counts the input columns (pads included) consumed so far."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state: InferenceState | None = None):
        super().__init__(layers=[])
        self.state = state
        self.columns = 0
        self.pending: int | None = None  # new columns of a generate() that restarts from this cache
        self.prompt_left: int | None = None  # inside generate(): prompt columns not fed yet (then 0: generated ones)
        self.last_logits: torch.Tensor | None = None  # [B, 1, V]: each row's logits at its last real token

    def keep_last_logits(self, logits_BKV: torch.Tensor, mask_BT: torch.Tensor | None, *, last_only: bool) -> None:
        """Keeps each row's logits at its last real token, from every call that continues this cache. With
        `last_only` (one kept column, pads moved to the front), a row of this call with no real token (a prompt
        chunk of padding only) gets the kept logits of its last real token from an earlier call."""
        K, T = logits_BKV.shape[1], (logits_BKV.shape[1] if mask_BT is None else mask_BT.shape[1])
        if mask_BT is None:
            real = torch.ones(logits_BKV.shape[0], dtype=torch.bool, device=logits_BKV.device)
            last = logits_BKV[:, -1:]
        elif last_only:
            real = mask_BT.bool().any(-1).to(logits_BKV.device)
            last = logits_BKV[:, -1:]
        elif K == T:  # every position's logits: pick each row's last real one
            real = mask_BT.bool().any(-1).to(logits_BKV.device)
            at = (torch.arange(T, device=mask_BT.device) * mask_BT.bool()).argmax(-1).to(logits_BKV.device)
            last = logits_BKV.gather(1, at[:, None, None].expand(-1, 1, logits_BKV.shape[2]))
        else:  # a window of logits that may not hold the last real token: nothing reliable to keep
            self.last_logits = None
            return
        kept = self.last_logits
        if kept is not None and kept.shape == last.shape:  # rows with a real token keep their own (no host sync)
            last = torch.where(real[:, None, None], last, kept.to(last.dtype))
            if last_only:
                logits_BKV[:, -1:] = last
        self.last_logits = last.detach().clone()

    def state_for(self, core: InfiniteVL, batch_size: int) -> InferenceState:
        if self.state is None:
            self.state = core.new_state(batch_size)
        elif self.state.batch_size != batch_size:
            raise ValueError(f"the cache holds {self.state.batch_size} rows but the input has {batch_size}: "
                             f"start a new cache (past_key_values=None) for a different batch")
        return self.state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def batch_size(self) -> int:
        return 0 if self.state is None else self.state.batch_size

    def reset(self) -> None:
        if self.state is not None:
            self.state.reset()
        self.columns = 0
        self.pending = self.prompt_left = None
        self.last_logits = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.select(beam_idx)
        if self.last_logits is not None:
            self.last_logits = self.last_logits[beam_idx.to(self.last_logits.device)]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.batch_size, device=self.state.seen.device).repeat_interleave(repeats)
            self.state = self.state.select(rows)
            if self.last_logits is not None:
                self.last_logits = self.last_logits.repeat_interleave(repeats, 0)

    def crop(self, max_length: int) -> None:
        raise ValueError("InfiniteVL's state is recurrent and cannot be cropped: regenerate from the prompt instead "
                         "(assisted decoding and DoLa are not supported)")


# ---- the model ----
class InfiniteVLForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = InfiniteVLHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules: list[str] = []
    _supports_cache_class = True
    supports_gradient_checkpointing = True  # the decoder's flag (transformers sets every module's `gradient_checkpointing`)

    def __init__(self, config: InfiniteVLHFConfig, core: InfiniteVL | None = None):
        super().__init__(config)
        if core is None:
            core = InfiniteVL(config.to_core())
        # Not registered as a submodule: its three children are registered below under the released names, so the
        # state dict has exactly the released keys.
        object.__setattr__(self, "core", core)
        self.visual = core.visual
        self.model = core.model
        self.lm_head = core.lm_head
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # the core initialises its own parameters

    def train(self, mode: bool = True) -> "InfiniteVLForConditionalGeneration":
        super().train(mode)
        self.core.training = mode
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value
        self.core.lm_head = value

    # ---- loading / saving ----
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args: Any,
        config: InfiniteVLHFConfig | None = None,
        torch_dtype: Any = None,
        dtype: Any = None,
        device_map: Any = None,
        **kwargs: Any,
    ) -> "InfiniteVLForConditionalGeneration":
        """Loads a released-format checkpoint through `InfiniteVL.from_pretrained`. dtype (or torch_dtype):
        a torch dtype, its name, or "auto"/None (the config's dtype, else float32). device_map: None (cpu),
        "auto" (cuda when available, else cpu), a device, or {"": device}."""
        if model_args:
            raise ValueError("positional arguments after the path are not supported: pass keywords")
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in _RUN_SETTINGS}
        fixed = sorted(k for k in kwargs if k in _CHECKPOINT_KEYS)
        if fixed:
            raise ValueError(f"{fixed} describe the checkpoint (its shape and token ids) and come from its config.json: "
                             "leave them out (to change them, edit config.json and the weights)")
        unknown = sorted(set(kwargs) - _IGNORED_LOAD_KWARGS)
        if unknown:
            raise ValueError(f"from_pretrained does not support {unknown} for InfiniteVL: remove them (quantization "
                             f"and multi-device splitting are not available; config settings it takes: "
                             f"{sorted(_RUN_SETTINGS)})")
        path = _local_dir(pretrained_model_name_or_path, kwargs)
        hf_config = InfiniteVLHFConfig.from_pretrained(path)
        if config is not None and not isinstance(config, InfiniteVLHFConfig):
            raise ValueError(f"config must be an InfiniteVLHFConfig, got {type(config).__name__}")
        if config is not None:
            differ = _differences(config.to_core().to_dict(), hf_config.to_core().to_dict())
            if differ:
                raise ValueError(f"the config differs from the checkpoint's config.json in {', '.join(differ)} "
                                 "(given -> file): these describe the checkpoint; leave them out (to change them, edit "
                                 "config.json and the weights)")
            settings = {**{k: getattr(config, k) for k in _RUN_SETTINGS}, **settings}
        for k, v in settings.items():
            setattr(hf_config, k, v)
        torch_dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, hf_config)
        device = _resolve_device(device_map)
        core = InfiniteVL.from_pretrained(path, dtype=torch_dtype, device=device)
        core.set_backend("auto")
        hf_config.dtype = torch_dtype
        hf_config.name_or_path = str(pretrained_model_name_or_path)
        model = cls(hf_config, core=core)
        if (path / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(path)
        model.generation_config.use_cache = True
        if settings.get("pad_token_id") is not None:
            model.generation_config.pad_token_id = settings["pad_token_id"]
        if kwargs.get("output_loading_info"):
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model.eval()

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Released layout: config.json (with dtype) + model.safetensors (tied embeddings stored once) +
        generation_config.json."""
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported here: save, then upload the directory with huggingface_hub")
        self.core.save_pretrained(save_directory)
        # The same file plus "dtype", so that dtype="auto" reloads in the dtype the weights were saved in.
        self.config.dtype = self.dtype
        self.config.to_json_file(Path(save_directory) / "config.json")
        self.generation_config.save_pretrained(save_directory)

    # ---- forward ----
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cache_position: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for the new tokens, continuing `cache` (an `InferenceStateCache`; `past_key_values` before
        transformers 5.24 named it so, and both names are accepted) when given.

        attention_mask [B, T] (or [B, past + T], as generate() passes it: the last T columns are used).
        position_ids: M-RoPE positions [3, B, T] (or [B, T]); computed from the state when omitted.
        labels [B, T]: loss = mean cross-entropy of token t+1 given tokens <= t, ignoring -100.
        cache_position and mm_token_type_ids are accepted and not needed.
        logits_to_keep=1 with an attention mask (how generate() calls it) gives each row the logits of its last real
        token, whatever the padding side: when a chunk of a row is all padding, those of an earlier chunk.
        Inside generate(), the columns after the prompt were generated: a placeholder id among them is text.
        """
        past_key_values = _one_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if labels is not None and past_key_values is None:
            use_cache = False  # training: one full forward, no state
        cache = _cache_for(past_key_values, use_cache)
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pass input_ids (or inputs_embeds with position_ids)")
        if input_ids is not None:
            check_input_ids(input_ids)  # [batch, tokens] integers, with the fix named
        if labels is not None and (not torch.is_tensor(labels) or labels.shape != ref.shape[:2]):
            shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"labels must be a tensor shaped like input_ids {tuple(ref.shape[:2])} (-100 where no "
                             f"loss is taken), got {shape}")
        B, T = ref.shape[:2]
        if attention_mask is not None and attention_mask.shape[-1] != T:
            if cache is None or attention_mask.shape[-1] < T:
                raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns for {T} tokens: give one "
                                 f"column per token (or per past + new token when continuing a cache)")
            attention_mask = attention_mask[:, -T:]
        if labels is not None and logits_to_keep:
            raise ValueError("labels need the logits of every position: leave logits_to_keep=0")
        for name in ("output_hidden_states", "output_attentions"):
            if kwargs.get(name):
                raise ValueError(f"{name}=True is not available for InfiniteVL (linear attention keeps no attention "
                                 "maps; hidden states are not collected): leave it off")
        last_only = logits_to_keep == 1 and input_ids is not None and attention_mask is not None and position_ids is None
        if last_only:
            # the kept column must be each row's last real token: pads (right padding is the tokenizer's default)
            # move to the front; they change nothing in the state, and the real tokens keep their order
            input_ids, attention_mask = left_padded(input_ids, attention_mask)
        state = None if cache is None else cache.state_for(self.core, B)
        generated = cache is not None and cache.prompt_left == 0
        if cache is not None and cache.prompt_left:
            cache.prompt_left = max(0, cache.prompt_left - T)
        logits = self.core(
            input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            state=state, logits_to_keep=logits_to_keep, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, placeholders_as_text=generated,
        )
        if cache is not None:
            cache.columns += T
            if inputs_embeds is None:
                cache.keep_last_logits(logits, attention_mask, last_only=last_only)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch=kwargs.get("num_items_in_batch"))
        if return_dict is False:
            return tuple(x for x in (loss, logits, cache) if x is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: cache})

    # ---- generation ----
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' generate, with the model's constant-size state as the cache. Greedy, sampling and
        text-only beam search work; with images or videos, num_beams and num_return_sequences must be 1
        (repeat the prompt in the batch instead)."""
        gen_config = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache", gen_config.use_cache)
        expand = max(kwargs.get("num_beams", gen_config.num_beams) or 1,
                     kwargs.get("num_return_sequences", gen_config.num_return_sequences) or 1)
        if expand > 1 and any(kwargs.get(k) is not None for k in VISION_KEYS):
            raise ValueError("with images or videos, num_beams and num_return_sequences must be 1: repeat the prompt "
                             "(and its images) in the batch instead")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("generate(inputs_embeds=...) is not supported: pass input_ids (and pixel values)")
        if kwargs.get("cache_implementation") is not None or getattr(gen_config, "cache_implementation", None):
            raise ValueError("cache_implementation does not apply: InfiniteVL keeps its own constant-size state "
                             "(InferenceStateCache); leave it out")
        ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(ids):
            check_input_ids(ids)
            if ids.shape[1] == 0:
                raise ValueError("the prompt is empty: give at least one token")
        past = _one_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
        restart = isinstance(past, InferenceStateCache) and past.columns > 0
        if torch.is_tensor(mask) and torch.is_tensor(ids) and mask.shape == ids.shape and not restart:
            check_rows(mask)
        if restart:
            if kwargs.get("prefill_chunk_size") or getattr(gen_config, "prefill_chunk_size", None):
                raise ValueError("prefill_chunk_size with a returned cache is not supported: pass the new tokens "
                                 "without it (the state already holds the conversation so far)")
            if any(kwargs.get(k) is not None for k in VISION_KEYS):
                raise ValueError("images or videos in a continued conversation are not supported: generate from a "
                                 "fresh cache with the whole conversation and all of its media")
            # transformers' rule: input_ids are the whole conversation when the attention mask is as long as them
            # (no mask: one of ones), else only the new tokens; the state has consumed `columns` of the conversation
            full = not torch.is_tensor(mask) or mask.shape[-1] == ids.shape[-1]
            past.pending = ids.shape[-1] - past.columns if full else ids.shape[-1]
            consumed = mask[:, :mask.shape[-1] - past.pending] if torch.is_tensor(mask) and past.pending > 0 else None
            if (consumed is not None and consumed.shape[-1] == past.columns and past.state is not None
                    and not torch.equal(consumed.bool().sum(-1).to(past.state.seen.device), past.state.seen)):
                past.pending = None
                raise ValueError("the attention mask marks other earlier columns as real than the state consumed "
                                 "(e.g. pads after an early stop, masked only now): keep the earlier mask as it was, "
                                 "or generate without the cache")
            if past.pending < 1:
                past.pending = None
                raise ValueError(f"nothing new to generate from: the cache has consumed {past.columns} columns and "
                                 f"input_ids (with an attention mask as long) has {ids.shape[-1]}: add new tokens")
        if past is None and use_cache is not False:
            past = InferenceStateCache()
        if past is not None:  # under the name this transformers' generate() passes on
            kwargs[CACHE_NAME] = past
            if isinstance(past, InferenceStateCache) and torch.is_tensor(ids):
                # the columns of the prompt step(s); what follows is generated (a placeholder id there is text)
                past.prompt_left = past.pending if restart else ids.shape[-1]
        try:
            return super().generate(*args, **kwargs)
        finally:
            if isinstance(past, InferenceStateCache):
                past.pending = past.prompt_left = None  # also when transformers refused the call early

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        next_sequence_length: int | None = None,
        is_first_iteration: bool | None = False,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The columns the state has not seen yet (the whole prompt first, then the newest token) with their
        attention-mask columns; images and videos only with the prompt. generate()'s 2-D position ids are
        dropped: positions (M-RoPE) come from the state."""
        past_key_values = _one_cache(cache, past_key_values)
        cache = past_key_values if isinstance(past_key_values, InferenceStateCache) else None
        fresh = cache is None or cache.columns == 0
        n = input_ids.shape[1] if next_sequence_length is None else next_sequence_length
        if cache is not None and cache.pending is not None:
            n, cache.pending = cache.pending, None  # generate() restarted from this cache: its new columns
        if input_ids.shape[1] == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if n < 1:
            raise ValueError("nothing new to generate from: the cache has already consumed every input column "
                             "(continue a returned cache with the conversation so far plus at least one new token)")
        inputs: dict[str, Any] = {
            "input_ids": input_ids[:, -n:],
            "attention_mask": None if attention_mask is None else attention_mask[:, -n:],
            CACHE_NAME: past_key_values,
            "use_cache": kwargs.get("use_cache"),
        }
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        if fresh:
            inputs.update({k: kwargs[k] for k in VISION_KEYS if kwargs.get(k) is not None})
        device = self.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v for k, v in inputs.items()}


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, *, num_items_in_batch: Any = None) -> torch.Tensor:
    """Cross-entropy of token t+1 from position t (float32), ignoring -100; summed and divided by
    `num_items_in_batch` when given (gradient accumulation), else the mean."""
    V = logits_BTV.shape[-1]
    logits = logits_BTV[:, :-1].float().reshape(-1, V)
    target = labels_BT[:, 1:].to(logits.device).reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=-100)
    return F.cross_entropy(logits, target, ignore_index=-100, reduction="sum") / num_items_in_batch


def _one_cache(cache: Any, past_key_values: Any) -> Any:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the state as `cache` or as `past_key_values`, not both")
    return past_key_values if cache is None else cache


def _cache_for(past_key_values: Any, use_cache: bool) -> InferenceStateCache | None:
    if isinstance(past_key_values, InferenceStateCache):
        return past_key_values
    if past_key_values is not None and not (isinstance(past_key_values, Cache) and past_key_values.get_seq_length() == 0):
        raise ValueError(f"past_key_values is a {type(past_key_values).__name__} with content: InfiniteVL keeps a "
                         f"constant-size state, not a key/value cache; pass the past_key_values this model returned")
    return InferenceStateCache() if use_cache else None


# ---- loading helpers ----
def _local_dir(name_or_path: str | Path, kwargs: dict[str, Any]) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).count("/") != 1:
        raise ValueError(f"{name_or_path} is not a checkpoint directory (nor a hub id 'owner/name')")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            str(name_or_path), revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"), local_files_only=bool(kwargs.get("local_files_only")),
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"],
        )
    except Exception as e:  # network, auth, not found: one clear message
        raise ValueError(f"cannot fetch {name_or_path} from the hub ({e}): download it and pass the directory") from e
    return Path(local)


_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "half": torch.float16}


def _resolve_dtype(value: Any, config: InfiniteVLHFConfig) -> torch.dtype:
    if value is None or value == "auto":
        value = config.dtype if config.dtype is not None else torch.float32
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError(f"dtype {value} is not supported: use float32, bfloat16 or float16")
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"dtype {value!r} is not supported: use a torch dtype, 'float32', 'bfloat16', 'float16' or 'auto'")


def _resolve_device(device_map: Any) -> torch.device:
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError("device_map splitting the model over several devices is not supported: pass one device")
        device_map = devices.pop()
    if device_map is None:
        return torch.device("cpu")
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device_map {device_map!r} is not a device: use 'auto', 'cpu', 'cuda', 'cuda:N'") from e


# ---- registration ----
def register() -> None:
    """Registers the config and model with transformers' Auto classes (idempotent), and the torchvision-free
    video processor when torchvision is missing."""
    from .processing import register_video_processor

    AutoConfig.register(MODEL_TYPE, InfiniteVLHFConfig, exist_ok=True)
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel):
        auto.register(InfiniteVLHFConfig, InfiniteVLForConditionalGeneration, exist_ok=True)
    register_video_processor(InfiniteVLHFConfig)
