"""The training CLI: every shipped YAML loads into its stage config, overrides apply, typos are
errors, and `convert` writes a loadable student."""
from __future__ import annotations

import json

import pytest

from infinitevl import InfiniteVL
from infinitevl.cli_train import STAGES, _stage, convert_main, train_main
from infinitevl.training import options

from .conftest import ROOT

CONFIGS = {"distill_layer.yaml": "distill-layer", "distill_e2e.yaml": "distill-e2e", "sft.yaml": "sft",
           "long_sft.yaml": "long-sft", "tiny/teacher_sft.yaml": "sft", "tiny/distill_layer.yaml": "distill-layer",
           "tiny/distill_e2e.yaml": "distill-e2e", "tiny/sft.yaml": "sft"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_load(name):
    _, cls = _stage(CONFIGS[name])
    cfg = options.load(cls, ROOT / "configs" / name, ["run.epochs=2", "optim.lr=1e-4"])
    assert cfg.run.epochs == 2.0 and cfg.optim.lr == 1e-4


def test_config_typos_and_print(capsys):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lerning_rate'\] in .*optim"):
        options.load(_stage("sft")[1], ROOT / "configs/sft.yaml", ["optim.lerning_rate=1"])
    with pytest.raises(SystemExit):
        train_main(["sft", "--config", str(ROOT / "configs/sft.yaml"), "--set", "run.paralel=ddp"])
    assert "paralel" in capsys.readouterr().err
    assert train_main(["sft", "--config", str(ROOT / "configs/sft.yaml"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == ["gdn", "attention"]
    assert set(STAGES) == {"distill-layer", "distill-e2e", "sft", "long-sft"}


def test_convert_command(hf_teacher_dir, tmp_path, capsys):
    assert convert_main(["--teacher", str(hf_teacher_dir), "--out", str(tmp_path / "s"), "--sliding-window", "64"]) == 0
    assert "3 GDN + 2 sliding-window layers" in capsys.readouterr().out
    m = InfiniteVL.from_pretrained(tmp_path / "s")
    assert m.config.text.sliding_window == 64
    with pytest.raises(SystemExit):
        convert_main(["--teacher", str(tmp_path / "s"), "--out", str(tmp_path / "t")])  # not a Qwen2.5-VL dir
