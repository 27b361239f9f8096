"""Model configuration: dataclasses, presets, and the mapping to/from the released config.json.

The released config.json is flat for the text model (Qwen2.5-VL style) with a nested
`vision_config`; newer files nest the text fields under `text_config`. Both load. Keys that
transformers writes but that do not change the function (`architectures`, `torch_dtype`, ...)
are accepted and dropped; any other unknown key is an error, so a typo cannot silently change
the model.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_TYPES = ("sliding_attention", "linear_attention")

# Keys transformers (or the published code) writes that carry no information for us.
_IGNORED_KEYS = {
    "architectures", "auto_map", "attn_implementation", "_attn_implementation", "attention_dropout",
    "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype", "transformers_version",
    "initializer_range", "max_window_layers", "mode", "use_cache", "model_type", "vision_token_id",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder",
    "tie_encoder_decoder", "chunk_size_feed_forward", "use_return_dict", "in_chans", "spatial_patch_size",
    "max_position_embeddings", "_from_model_config", "id2label", "label2id", "problem_type",
    "use_sliding_window", "base_config_key", "add_cross_attention", "tokenizer_class", "prefix",
    "decoder_start_token_id", "sep_token_id", "task_specific_params", "finetuning_task", "rope_type",
}


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    window_size: int = 112
    out_hidden_size: int = 2048
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    sliding_window: int = 8192
    layer_types: list[str] | None = None
    num_linear_heads: int = 16
    num_linear_key_value_heads: int = 16
    linear_head_dim: int = 128
    expand_v: float = 2
    conv_size: int = 4
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.layer_types is None:
            # The published rule: every fourth layer (0, 4, 8, ...) is sliding-window attention.
            self.layer_types = [
                "sliding_attention" if i % 4 == 0 else "linear_attention" for i in range(self.num_hidden_layers)
            ]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"unknown layer_types {bad}: use {LAYER_TYPES}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_linear_heads != self.num_linear_key_value_heads:
            raise ValueError("num_linear_heads must equal num_linear_key_value_heads (as in the released models)")
        if float(self.linear_head_dim * self.expand_v) != int(self.linear_head_dim * self.expand_v):
            raise ValueError(f"linear_head_dim * expand_v must be an integer, got {self.linear_head_dim * self.expand_v}")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        if self.sliding_window < 2:
            raise ValueError("sliding_window must be >= 2")

    @property
    def head_dim(self) -> int:
        # The published attention layer uses hidden_size // num_attention_heads, whatever head_dim says.
        return self.hidden_size // self.num_attention_heads

    @property
    def linear_value_dim(self) -> int:
        return int(self.linear_head_dim * self.expand_v)


@dataclass
class InfiniteVLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int | list[int] | None = 151645
    bos_token_id: int | None = 151643

    def __post_init__(self):
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size ({self.vision.out_hidden_size}) must equal the text hidden_size "
                f"({self.text.hidden_size})"
            )

    # ---- released config.json <-> dataclasses ----
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InfiniteVLConfig":
        d = dict(d)
        model_type = str(d.get("model_type", "infinite_vl"))
        if model_type not in ("infinite_vl", "infinitevl"):
            hint = (": this is a Qwen2.5-VL checkpoint; `infinitevl convert --teacher DIR --out NEW_DIR` turns it into "
                    "an InfiniteVL initialisation (to be trained, see README *Training*)") if model_type.startswith(
                "qwen2") else ": point to an InfiniteVL checkpoint (hustvl/InfiniteVL or hustvl/InfiniteVL-LongSFT)"
            raise ValueError(f"config.json has model_type {model_type!r}, not 'infinite_vl'{hint}")
        vision_d = d.pop("vision_config", None)
        text_d = d.pop("text_config", None)
        top_fields = {f.name for f in dataclasses.fields(cls)} - {"text", "vision"}
        top = {k: d.pop(k) for k in list(d) if k in top_fields}
        # Flat layout: the remaining top-level keys are text fields.
        text_src = dict(d) if text_d is None else {**d, **text_d}
        if vision_d is None:
            raise ValueError("config.json has no vision_config: a released InfiniteVL config always has one")
        eos = text_src.get("eos_token_id", None)
        if "eos_token_id" not in top and eos is not None:
            top["eos_token_id"] = eos
        bos = text_src.get("bos_token_id", None)
        if "bos_token_id" not in top and bos is not None:
            top["bos_token_id"] = bos
        return cls(text=_text_from_dict(text_src), vision=_build(VisionConfig, vision_d, "vision_config"), **top)

    def to_dict(self) -> dict[str, Any]:
        """The released layout: flat text fields, nested vision_config."""
        out: dict[str, Any] = {"model_type": "infinite_vl", "architectures": ["InfiniteVLForConditionalGeneration"]}
        text = dataclasses.asdict(self.text)
        mrope = text.pop("mrope_section")
        out.update(text)
        out["rope_scaling"] = {"mrope_section": mrope, "rope_type": "default", "type": "default"}
        out["use_sliding_window"] = True
        out["vision_config"] = dataclasses.asdict(self.vision)
        for f in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                  "eos_token_id", "bos_token_id"):
            out[f] = getattr(self, f)
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "InfiniteVLConfig":
        path = Path(path)
        if not path.exists() and not path.parent.exists() and str(path).count("/") == 1 and \
                not str(path).startswith((".", "/", "~")):
            raise ValueError(f"{path} is not a local directory. Hub ids are not downloaded here: fetch the checkpoint "
                             f"first (e.g. huggingface-cli download {path} --local-dir {path.name}) and pass that "
                             "directory")
        if not path.exists():
            raise ValueError(f"{path} does not exist: point to a released-format InfiniteVL checkpoint directory "
                             "(config.json + model*.safetensors + tokenizer files)")
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ValueError(f"{path.parent} has no config.json: point to a released-format InfiniteVL checkpoint "
                             "directory (config.json + model*.safetensors + tokenizer files)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object (a model config)")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _build(klass, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(k for k in d if k not in names and k not in _IGNORED_KEYS)
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in {where}: remove them or fix the spelling (known: {sorted(names)})"
        )
    return klass(**{k: v for k, v in d.items() if k in names})


_TEXT_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads")


def _text_from_dict(d: dict[str, Any]) -> TextConfig:
    d = dict(d)
    missing = [k for k in _TEXT_REQUIRED if k not in d]
    if missing:
        raise ValueError(f"config.json lacks required text field(s) {missing}: a released config has them all")
    for flag, want in (("use_gate", True), ("use_short_conv", True), ("conv_bias", False)):
        if d.pop(flag, want) != want:
            raise ValueError(f"{flag}={not want} is not supported: the released InfiniteVL uses {flag}={want}")
    rope = d.pop("rope_scaling", None) or d.pop("rope_parameters", None) or {}
    if "rope_theta" in rope and "rope_theta" not in d:
        d["rope_theta"] = rope["rope_theta"]
    if rope.get("mrope_section") is not None:
        d["mrope_section"] = list(rope["mrope_section"])
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ValueError(f"rope type {rope.get('rope_type')!r} is not supported: InfiniteVL uses default M-RoPE")
    head_dim = d.pop("head_dim", None)
    if head_dim is not None and head_dim != d["hidden_size"] // d["num_attention_heads"]:
        raise ValueError(
            f"head_dim {head_dim} != hidden_size // num_attention_heads; the released attention uses the latter"
        )
    if d.get("sliding_window") is None:
        raise ValueError("config.json lacks sliding_window: InfiniteVL's attention layers are sliding-window")
    return _build(TextConfig, d, "the text config")


def preset(name: str) -> InfiniteVLConfig:
    """Named shapes: `4b` is the released model, `tiny` is for tests and the shipped demo model."""
    if name in ("4b", "infinitevl-4b"):
        return InfiniteVLConfig()
    if name == "tiny":
        return InfiniteVLConfig(
            text=TextConfig(
                vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 6, 6], sliding_window=32,
                num_linear_heads=4, num_linear_key_value_heads=4, linear_head_dim=32, norm_eps=1e-6,
            ),
            vision=VisionConfig(
                depth=4, hidden_size=64, intermediate_size=128, num_heads=4, window_size=56,
                out_hidden_size=128, fullatt_block_indexes=[1, 3],
            ),
            image_token_id=1001, video_token_id=1002, vision_start_token_id=1003, vision_end_token_id=1004,
            eos_token_id=None, bos_token_id=None,
        )
    raise ValueError(f"unknown preset {name!r}: use '4b' or 'tiny'")
