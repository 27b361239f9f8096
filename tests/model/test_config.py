import json

import pytest

from infinitevl.model.config import InfiniteVLConfig, preset

from ..conftest import REFERENCE_TINY

RELEASED_4B = {  # the released hustvl/InfiniteVL config.json (flat text fields, nested vision)
    "attn_implementation": "flash_attention_2", "architectures": ["InfiniteVLQwen2_5_VLForConditionalGeneration"],
    "auto_map": {"AutoConfig": "configuration_infinitevl.InfiniteVLConfig"}, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 2048,
    "image_token_id": 151655, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 128000, "max_window_layers": 70, "model_type": "infinite_vl",
    "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0, "sliding_window": 8192, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0", "use_cache": False, "use_sliding_window": True, "video_token_id": 151656,
    "vision_config": {"depth": 32, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu",
                      "hidden_size": 1280, "in_channels": 3, "in_chans": 3, "intermediate_size": 3420,
                      "model_type": "infinite_vl", "num_heads": 16, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
                      "tokens_per_second": 2, "torch_dtype": "bfloat16", "window_size": 112},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652, "vision_token_id": 151654, "vocab_size": 151936,
}


def test_released_flat_config_defaults():
    cfg = InfiniteVLConfig.from_dict(RELEASED_4B)
    t = cfg.text
    assert t.layer_types[:5] == ["sliding_attention", "linear_attention", "linear_attention", "linear_attention",
                                 "sliding_attention"]
    assert t.layer_types.count("sliding_attention") == 9
    assert (t.num_linear_heads, t.linear_head_dim, t.expand_v, t.conv_size, t.norm_eps) == (16, 128, 2, 4, 1e-5)
    assert t.head_dim == 128 and t.sliding_window == 8192 and t.mrope_section == [16, 24, 24]
    assert cfg == preset("4b")


def test_nested_fixture_config_and_round_trip(tmp_path):
    cfg = InfiniteVLConfig.from_file(REFERENCE_TINY / "model")
    assert cfg.text.norm_eps == 1e-6 and cfg.text.sliding_window == 32 and cfg.vision.window_size == 56
    cfg.save(tmp_path)
    assert InfiniteVLConfig.from_file(tmp_path) == cfg
    assert "vision_config" in json.loads((tmp_path / "config.json").read_text())


def test_unknown_key_is_named():
    bad = dict(RELEASED_4B, hiden_size=3)
    with pytest.raises(ValueError, match="hiden_size"):
        InfiniteVLConfig.from_dict(bad)
    bad = dict(RELEASED_4B, vision_config=dict(RELEASED_4B["vision_config"], dept=3))
    with pytest.raises(ValueError, match="dept"):
        InfiniteVLConfig.from_dict(bad)


def test_missing_and_invalid_fields():
    for key in ("hidden_size", "sliding_window", "vision_config"):
        bad = {k: v for k, v in RELEASED_4B.items() if k != key}
        with pytest.raises(ValueError, match=key):
            InfiniteVLConfig.from_dict(bad)
    with pytest.raises(ValueError, match="use_short_conv"):
        InfiniteVLConfig.from_dict(dict(RELEASED_4B, use_short_conv=False))
    with pytest.raises(ValueError, match="layer_types"):
        InfiniteVLConfig.from_dict(dict(RELEASED_4B, layer_types=["linear_attention"] * 3))
    with pytest.raises(ValueError, match="model_type"):
        InfiniteVLConfig.from_dict(dict(RELEASED_4B, model_type="llama"))
    with pytest.raises(ValueError, match="does-not-exist does not exist"):
        InfiniteVLConfig.from_file(REFERENCE_TINY / "does-not-exist")
    with pytest.raises(ValueError, match="has no config.json"):
        InfiniteVLConfig.from_file(REFERENCE_TINY.parent)
    with pytest.raises(ValueError, match="infinitevl convert"):  # a Qwen2.5-VL checkpoint: say how to convert it
        InfiniteVLConfig.from_dict(dict(RELEASED_4B, model_type="qwen2_5_vl"))


def test_corrupt_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        InfiniteVLConfig.from_file(tmp_path)
