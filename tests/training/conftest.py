"""Shared fixtures for the training tests: a tiny random transformers Qwen2.5-VL teacher (with the
shipped tiny tokenizer, so its token ids are real), and a small chat dataset of generated images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY_ASSET = ROOT / "src/infinitevl/assets/tiny-infinitevl"


def hf_teacher_config(*, layers: int = 5):
    from transformers import Qwen2_5_VLConfig

    ids = json.loads((TINY_ASSET / "config.json").read_text())
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
            bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["bos_token_id"],
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                           out_hidden_size=64, fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def hf_teacher_dir(tmp_path_factory) -> Path:
    """A tiny random transformers Qwen2.5-VL checkpoint directory (5 layers: attention kept at 0 and 4)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path_factory.mktemp("teacher")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = Qwen2_5_VLForConditionalGeneration(hf_teacher_config())
        # transformers initialises the head std 0.02: scale up so logits are not all flat.
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.mul_(3.0)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        shutil.copy2(TINY_ASSET / name, out / name)
    return out


def synthetic_task():
    """tools/synthetic_task.py as a module (tools/ is not a package)."""
    import importlib.util
    import sys

    if "synthetic_task" not in sys.modules:
        spec = importlib.util.spec_from_file_location("synthetic_task", ROOT / "tools/synthetic_task.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["synthetic_task"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["synthetic_task"]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic data set: 36 training records over all six tasks (6 videos), 12 test records."""
    out = tmp_path_factory.mktemp("synth")
    st = synthetic_task()
    st.make_split(out, "train", 36, seed=0)
    st.make_split(out, "test", 12, seed=0)
    return out
