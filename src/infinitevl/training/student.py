"""Teacher -> student: a transformers Qwen2.5-VL checkpoint becomes an InfiniteVL initialisation.

The teacher is read into our own model class with every layer a "sliding_attention" layer whose
window is longer than any input (that is Qwen2.5-VL's full attention: same q/k/v biases, M-RoPE,
GQA), so teacher and student run through the same code, packed rows included.

The student (the published recipe, LLaMA-Factory `convert_attention` with `mixer: GatedDeltaNet`):
layer i keeps its attention when i % attention_every == 0 and becomes Gated DeltaNet otherwise.
Everything else is copied: vision tower and merger, embeddings, every MLP and norm, the kept
attention layers, the (tied) head. The new GDN layers are fresh: the published converter builds
them from scratch and does NOT copy the teacher's q/k/v/o projections (only its Mamba2 path does),
then applies the "mimic" init: A_log = 0 (A = 1), a_proj = b_proj = 0 (so beta = 0.5),
dt_bias = softplus^-1(0.001), and each short-conv kernel the identity (last tap 1).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..layers.gated_deltanet import GatedDeltaNet
from ..model import checkpoint
from ..model.config import InfiniteVLConfig, TextConfig, VisionConfig
from ..model.infinitevl import InfiniteVL

# Files of a transformers checkpoint directory that describe the tokenizer and the processor.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
)
TEACHER_MODEL_TYPES = ("qwen2_5_vl",)


@dataclass
class StudentSpec:
    """How the teacher's decoder turns into the hybrid one (defaults: the published 3B -> InfiniteVL)."""

    attention_every: int = 4  # layer i keeps attention when i % attention_every == 0
    sliding_window: int = 8192  # tokens the kept attention layers see
    num_linear_heads: int | None = None  # default: the teacher's attention heads
    linear_head_dim: int | None = None  # default: the teacher's head dim
    expand_v: float = 2  # GDN value dim = expand_v x linear_head_dim
    conv_size: int = 4  # taps of the GDN short convolution
    norm_eps: float = 1e-5  # the GDN output norm's epsilon
    mimic_init: bool = True  # the published init (decay ~0.999, beta 0.5, identity convs); false: fresh
    seed: int = 0  # for the new GDN weights

    def __post_init__(self):
        if self.attention_every < 1:
            raise ValueError(f"spec.attention_every (--attention-every) must be >= 1, got {self.attention_every}")
        if self.sliding_window < 1 or self.conv_size < 1 or not self.expand_v > 0:
            raise ValueError(f"spec.sliding_window and spec.conv_size must be >= 1 and spec.expand_v > 0; got "
                             f"{self.sliding_window}, {self.conv_size}, {self.expand_v}")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"spec.norm_eps must be a small positive number (e.g. 1e-5), got {self.norm_eps}")
        for name in ("num_linear_heads", "linear_head_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"spec.{name} must be >= 1 (or left out for the teacher's), got "
                                 f"{getattr(self, name)}")


# ---------------------------------------------------------------- teacher


def teacher_config(d: dict[str, Any], *, where: str = "config.json", sliding_window: int | None = None
                   ) -> InfiniteVLConfig:
    """Our config for a transformers Qwen2.5-VL config dict: all layers attention, with a window of
    max_position_embeddings (full attention for any input the teacher accepts) unless given."""
    if d.get("model_type") not in TEACHER_MODEL_TYPES:
        raise ValueError(
            f"{where} has model_type {d.get('model_type')!r}; the teacher must be a transformers Qwen2.5-VL "
            f"checkpoint (model_type {', '.join(TEACHER_MODEL_TYPES)}). To continue from an InfiniteVL checkpoint, "
            "train it directly."
        )
    text = dict(d)
    text.update(d.get("text_config") or {})
    if text.get("use_sliding_window"):
        raise ValueError(f"{where} sets use_sliding_window=true; a Qwen2.5-VL teacher is expected to use full attention")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 1e6))
    mrope = rope.get("mrope_section")
    if mrope is None:
        raise ValueError(f"{where} has no mrope_section (rope_parameters/rope_scaling): is this a Qwen2.5-VL config?")
    vd = dict(d.get("vision_config") or {})
    vrope = vd.get("rope_parameters") or {}
    if vrope.get("rope_theta", 10000.0) != 10000.0:
        raise ValueError(f"{where}: vision rope_theta {vrope['rope_theta']} is not supported (Qwen2.5-VL uses 10000)")
    n_layers = text["num_hidden_layers"]
    window = sliding_window or int(text.get("max_position_embeddings") or 32768)
    tc = TextConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
        num_hidden_layers=n_layers, num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"], rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), mrope_section=list(mrope), sliding_window=window,
        layer_types=["sliding_attention"] * n_layers,
        num_linear_heads=text["num_attention_heads"], num_linear_key_value_heads=text["num_attention_heads"],
        linear_head_dim=text["hidden_size"] // text["num_attention_heads"],
        tie_word_embeddings=bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        hidden_act=text.get("hidden_act", "silu"),
    )
    vision_fields = {f for f in VisionConfig.__dataclass_fields__}
    vision = VisionConfig(**{k: v for k, v in vd.items() if k in vision_fields})
    if "in_chans" in vd and "in_channels" not in vd:
        vision.in_channels = vd["in_chans"]
    ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
           if d.get(k) is not None}
    return InfiniteVLConfig(
        text=tc, vision=vision, **ids,
        eos_token_id=text.get("eos_token_id"), bos_token_id=text.get("bos_token_id"),
    )


def is_qwen2_5_vl(path: str | Path) -> bool:
    """Whether a checkpoint directory holds a transformers Qwen2.5-VL model (rather than an InfiniteVL)."""
    f = Path(path) / "config.json"
    if not f.exists():
        raise ValueError(f"no config.json in {path}: point at a checkpoint directory")
    return json.loads(f.read_text()).get("model_type") in TEACHER_MODEL_TYPES


def load_teacher(path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu",
                 sliding_window: int | None = None) -> InfiniteVL:
    """A transformers Qwen2.5-VL checkpoint directory as an (all-attention) InfiniteVL, in eval mode.
    `sliding_window` bounds the attention (and an inference state's ring buffer) when set."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"no config.json in {path}: point the teacher at a transformers Qwen2.5-VL checkpoint directory")
    config = teacher_config(json.loads(cfg_file.read_text()), where=str(cfg_file), sliding_window=sliding_window)
    with torch.device("meta"):
        model = InfiniteVL(config)
    model = model.to_empty(device=device).to(dtype)
    checkpoint.load_into(model, checkpoint.read_weights(path), tied=config.text.tie_word_embeddings)
    if config.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def teacher_to_hf_config(config: InfiniteVLConfig) -> dict[str, Any]:
    """The transformers Qwen2.5-VL config.json for an all-attention model (inverse of `teacher_config`)."""
    t, v = config.text, config.vision
    if any(k != "sliding_attention" for k in t.layer_types):
        raise ValueError("only an all-attention model can be written as a Qwen2.5-VL teacher")
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id, "vision_end_token_id": config.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "text_config": {
            "model_type": "qwen2_5_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps, "hidden_act": t.hidden_act, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "mrope_section": list(t.mrope_section), "rope_theta": t.rope_theta},
            "tie_word_embeddings": t.tie_word_embeddings, "use_sliding_window": False,
            "eos_token_id": config.eos_token_id, "bos_token_id": config.bos_token_id,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size, "tokens_per_second": v.tokens_per_second,
            "window_size": v.window_size, "out_hidden_size": v.out_hidden_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes), "hidden_act": v.hidden_act,
        },
    }


def save_teacher(model: InfiniteVL, path: str | Path) -> None:
    """Writes an all-attention model as a transformers Qwen2.5-VL checkpoint (legacy names load there)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(teacher_to_hf_config(model.config), indent=2) + "\n")
    checkpoint.save_weights(model, path, tied=model.config.text.tie_word_embeddings)


# ---------------------------------------------------------------- student


def student_config(teacher: InfiniteVLConfig, spec: StudentSpec) -> InfiniteVLConfig:
    t = teacher.text
    n = t.num_hidden_layers
    layer_types = ["sliding_attention" if i % spec.attention_every == 0 else "linear_attention" for i in range(n)]
    heads = spec.num_linear_heads or t.num_attention_heads
    text = TextConfig(**{
        **{k: getattr(t, k) for k in t.__dataclass_fields__},
        "sliding_window": spec.sliding_window, "layer_types": layer_types,
        "num_linear_heads": heads, "num_linear_key_value_heads": heads,
        "linear_head_dim": spec.linear_head_dim or t.head_dim, "expand_v": spec.expand_v,
        "conv_size": spec.conv_size, "norm_eps": spec.norm_eps,
    })
    return InfiniteVLConfig(
        text=text, vision=teacher.vision, image_token_id=teacher.image_token_id,
        video_token_id=teacher.video_token_id, vision_start_token_id=teacher.vision_start_token_id,
        vision_end_token_id=teacher.vision_end_token_id, eos_token_id=teacher.eos_token_id,
        bos_token_id=teacher.bos_token_id,
    )


@torch.no_grad()
def mimic_init_(gdn: GatedDeltaNet) -> None:
    """The published "mimic" init of a fresh Gated DeltaNet layer (see the module docstring)."""
    gdn.A_log.zero_()
    gdn.a_proj.weight.zero_()
    gdn.b_proj.weight.zero_()
    dt = torch.full_like(gdn.dt_bias, 1e-3, dtype=torch.float64)
    gdn.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    for conv in (gdn.q_conv1d, gdn.k_conv1d, gdn.v_conv1d):
        conv.weight.zero_()
        conv.weight[:, 0, -1] = 1.0


def gdn_layer_indices(config: InfiniteVLConfig) -> list[int]:
    return [i for i, k in enumerate(config.text.layer_types) if k == "linear_attention"]


def build_student(teacher: InfiniteVL, spec: StudentSpec = StudentSpec()) -> InfiniteVL:
    """A new InfiniteVL whose copied parts equal the teacher's and whose GDN layers are fresh."""
    config = student_config(teacher.config, spec)
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(spec.seed)
        student = InfiniteVL(config)
    p = next(teacher.parameters())
    student = student.to(dtype=p.dtype, device=p.device)
    gdn = set(gdn_layer_indices(config))
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    with torch.no_grad():
        for name, tensor in s_state.items():
            if any(name.startswith(f"model.layers.{i}.self_attn.") for i in gdn):
                continue
            tensor.copy_(t_state[name])
    if spec.mimic_init:
        for i in gdn:
            mimic_init_(student.model.layers[i].self_attn)
    return student


def copy_processor_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer/processor files of a checkpoint directory; returns their names."""
    copied = []
    for name in PROCESSOR_FILES:
        f = Path(src, name)
        if f.exists():
            shutil.copy2(f, Path(dst, name))
            copied.append(name)
    return copied


def convert(teacher_dir: str | Path, out_dir: str | Path, spec: StudentSpec = StudentSpec(), *,
            overwrite: bool = False) -> InfiniteVL:
    """Teacher checkpoint dir -> student checkpoint dir (released InfiniteVL format, float32 weights).

    A non-empty `out_dir` is an error unless `overwrite`; the student is written to a sibling folder first
    and moved into place whole, so a failed conversion never leaves a half-written checkpoint."""
    if Path(out_dir).expanduser().resolve() == Path(teacher_dir).resolve():
        raise ValueError(f"the output directory {out_dir} is the teacher's: choose another one")
    out_dir = checkpoint.output_dir(out_dir, overwrite=overwrite)
    teacher = load_teacher(teacher_dir)
    student = build_student(teacher, spec)

    def fill(folder: Path) -> None:
        student.save_pretrained(folder)
        copy_processor_files(teacher_dir, folder)
        n_new = sum(p.numel() for i in gdn_layer_indices(student.config)
                    for p in student.model.layers[i].self_attn.parameters())
        (folder / "conversion.json").write_text(json.dumps({
            "teacher": str(teacher_dir), "spec": dataclasses.asdict(spec), "new_gdn_params": n_new,
            "gdn_layers": gdn_layer_indices(student.config),
        }, indent=2) + "\n")

    checkpoint.write_whole(out_dir, fill)
    return student
