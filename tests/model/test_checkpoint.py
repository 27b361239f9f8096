import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from infinitevl import InfiniteVL, preset

from ..conftest import REFERENCE_TINY


@pytest.fixture(scope="module")
def weights():
    return load_file(str(REFERENCE_TINY / "model" / "model.safetensors"))


def _write(tmp_path, tensors, config_src=REFERENCE_TINY / "model" / "config.json"):
    shutil.copy(config_src, tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def _logits(model):
    ids = torch.arange(40).view(1, 40)
    with torch.no_grad():
        return model(ids)


@pytest.fixture(scope="module")
def reference_logits():
    return _logits(InfiniteVL.from_pretrained(REFERENCE_TINY / "model"))


def test_released_layout_has_no_lm_head_and_round_trips(tmp_path, weights, reference_logits):
    assert "lm_head.weight" not in weights
    model = InfiniteVL.from_pretrained(REFERENCE_TINY / "model")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(weights)
    torch.testing.assert_close(_logits(InfiniteVL.from_pretrained(tmp_path)), reference_logits, rtol=0, atol=0)


def test_newer_layout_and_sharded_index(tmp_path, weights, reference_logits):
    renamed = {}
    for k, v in weights.items():
        k = "model.language_model." + k[len("model."):] if k.startswith("model.") else "model." + k
        renamed[k] = v
    names = sorted(renamed)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: renamed[k] for k in keys}, str(tmp_path / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(REFERENCE_TINY / "model" / "config.json", tmp_path / "config.json")
    torch.testing.assert_close(_logits(InfiniteVL.from_pretrained(tmp_path)), reference_logits, rtol=0, atol=0)


def test_explicit_tied_lm_head_is_accepted(tmp_path, weights, reference_logits):
    w = dict(weights, **{"lm_head.weight": weights["model.embed_tokens.weight"].clone()})
    model = InfiniteVL.from_pretrained(_write(tmp_path, w))
    torch.testing.assert_close(_logits(model), reference_logits, rtol=0, atol=0)


def test_bfloat16_load():
    model = InfiniteVL.from_pretrained(REFERENCE_TINY / "model", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(_logits(model)).all()


def test_missing_weight(tmp_path, weights):
    w = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.A_log"}
    with pytest.raises(ValueError, match=r"missing weight.*A_log"):
        InfiniteVL.from_pretrained(_write(tmp_path, w))


def test_misshaped_weight(tmp_path, weights):
    w = dict(weights)
    w["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"wrong shape.*q_proj"):
        InfiniteVL.from_pretrained(_write(tmp_path, w))


def test_unexpected_weight(tmp_path, weights):
    w = dict(weights, **{"model.layers.99.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        InfiniteVL.from_pretrained(_write(tmp_path, w))


def test_corrupt_and_absent_weights(tmp_path):
    shutil.copy(REFERENCE_TINY / "model" / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="no model.safetensors"):
        InfiniteVL.from_pretrained(tmp_path)
    data = (REFERENCE_TINY / "model" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        InfiniteVL.from_pretrained(tmp_path)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = InfiniteVL(preset("tiny"))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
