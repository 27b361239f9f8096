"""Reading and writing checkpoints in the released format.

Our module names are the released (legacy Qwen2.5-VL) names, so the released layout loads as is.
The one name-mapping table below turns the newer transformers layout into ours.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# newer transformers layout -> released/ours (first match wins)
KEY_MAP: list[tuple[str, str]] = [
    (r"^model\.language_model\.", "model."),
    (r"^model\.visual\.", "visual."),
    (r"^language_model\.model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
TIED_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


def to_released_name(key: str) -> str:
    for pattern, repl in KEY_MAP:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))  # a fast tokenizer, or a slow one's pair


def require_tokenizer(directory: str | Path) -> None:
    """A ValueError naming the missing files when a checkpoint `directory` (one with a config.json) has no
    tokenizer: cheap, so callers check it before reading the weights (and before transformers' long error)."""
    d = Path(directory)
    if (d / "config.json").is_file() and not any(all((d / f).exists() for f in group) for group in TOKENIZER_FILES):
        raise ValueError(f"{d} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): copy them, with "
                         "tokenizer_config.json and preprocessor_config.json, from the released checkpoint")


VISION_TOKENS = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
                 "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}


def check_tokenizer(tokenizer, config, where: str | Path) -> None:
    """A ValueError when `tokenizer` gives the vision tokens other ids than the model's config: the tokenizer of
    another model (the processor would then write placeholders the model does not read as images)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor: its tokenizer
    wrong = [f"{token} is {tokenizer.convert_tokens_to_ids(token)} in the tokenizer, {getattr(config, key)} in "
             f"config.json" for token, key in VISION_TOKENS.items()
             if tokenizer.convert_tokens_to_ids(token) != getattr(config, key)]
    if wrong:
        raise ValueError(f"the tokenizer in {where} does not belong to this model ({'; '.join(wrong)}): use the "
                         "tokenizer files released with the checkpoint")


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded with an index), released names."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e}): re-save the checkpoint") from e
        files = [directory / s for s in shards]
    elif single.exists():
        files = [single]
    else:
        raise ValueError(
            f"no model.safetensors or model.safetensors.index.json in {directory}: "
            f"give a released-format checkpoint directory (config.json with its safetensors weights)"
        )
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise ValueError(f"checkpoint shard {f} listed in the index is missing: download it again")
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {f} ({e}): the file is corrupt or truncated; download it again") from e
        for k, v in part.items():
            weights[to_released_name(k)] = v
    return weights


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], *, tied: bool) -> None:
    """Copy weights into `model` after checking every name and shape; raises ValueError on any mismatch."""
    expected = model.state_dict()
    weights = dict(weights)
    if tied:
        weights.pop(TIED_HEAD, None)
    elif TIED_HEAD not in weights and TIED_HEAD in expected:
        raise ValueError("the config says tie_word_embeddings=false but the checkpoint has no lm_head.weight")
    expected_names = {k for k in expected if not (tied and k == TIED_HEAD)}
    missing = sorted(expected_names - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if any(".lora_A." in k for k in unexpected):
        raise ValueError("these weights hold LoRA adapters that are not merged (a long-sft training checkpoint, "
                         "step-*): merge them with `infinitevl merge-lora STEP_DIR --out DIR` and load DIR (the "
                         "run's final/ is merged already)")
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the config: {len(missing)} missing weight(s) {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, {len(unexpected)} unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}. Check that config.json belongs to these weights."
        )
    bad = [(k, tuple(weights[k].shape), tuple(expected[k].shape)) for k in expected_names
           if weights[k].shape != expected[k].shape]
    if bad:
        k, got, want = bad[0]
        raise ValueError(
            f"{len(bad)} weight(s) have the wrong shape, e.g. {k}: checkpoint {got}, config expects {want}. "
            f"Check that config.json belongs to these weights."
        )
    with torch.no_grad():
        for k in expected_names:
            expected[k].copy_(weights[k])


def save_weights(model: torch.nn.Module, directory: str | Path, *, tied: bool) -> None:
    """model.safetensors in the released layout, written atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if tied:
        state.pop(TIED_HEAD, None)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / "model.safetensors")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _drop_shards(directory)


def _drop_shards(directory: Path) -> None:
    """Saving over a sharded checkpoint: its index (which readers prefer) and the shards it names go, after the
    new single file is in place, so that what loads is what was saved."""
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (json.JSONDecodeError, KeyError, AttributeError):
        shards = set()
    index.unlink()
    for name in shards:
        f = directory / name
        if f.name != "model.safetensors" and f.suffix == ".safetensors" and f.parent == directory and f.is_file():
            f.unlink()


def output_dir(path: str | Path, *, overwrite: bool) -> Path:
    """A directory to write a checkpoint into, as the real folder it names (`.` and symlinks resolved). A
    non-empty one is an error unless `overwrite` (and even then not the working directory or a folder holding it)."""
    out = Path(path).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ValueError(f"{out} already exists and is not empty: choose another output directory, or "
                             f"overwrite it on purpose (--force)")
        if Path.cwd().resolve().is_relative_to(out):
            raise ValueError(f"{out} holds the working directory: run this from elsewhere to replace it")
    return out


def write_whole(out: Path, fill: Callable[[Path], None]) -> None:
    """`fill(folder)` writes a checkpoint into a sibling folder, which then takes `out`'s place whole (an empty
    `out`, maybe the working folder, stays itself and receives the files), so a failure never leaves half a
    checkpoint, nor loses the one that was there."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        fill(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written is left beside the output
        raise
    if out.is_dir() and not any(out.iterdir()):
        for f in partial.iterdir():
            f.rename(out / f.name)
        partial.rmdir()
    elif out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        partial.rename(out)
        (shutil.rmtree if old.is_dir() else Path.unlink)(old)
    else:
        partial.rename(out)
