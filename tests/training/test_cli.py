"""The training CLI: every shipped YAML loads into its stage config, overrides apply, typos are
errors, and `convert` writes a loadable student."""
from __future__ import annotations

import json
from pathlib import Path

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
    err = capsys.readouterr().err
    assert "--set run.paralel: unknown key(s) ['paralel'] in run" in err
    assert train_main(["sft", "--config", str(ROOT / "configs/sft.yaml"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == ["gdn", "attention"]
    assert set(STAGES) == {"distill-layer", "distill-e2e", "sft", "long-sft"}
    # the defaults print before a model is chosen; a run still needs one
    assert train_main(["distill-layer", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["teacher"] == "" and printed["mse_factor"] == 1000.0
    with pytest.raises(SystemExit):
        train_main(["distill-layer"])
    assert "teacher is empty" in capsys.readouterr().err


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help_lists_every_config_key_with_its_default(stage, capsys):
    with pytest.raises(SystemExit) as e:
        train_main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    keys = {k for k, _, _ in options.describe_keys(_stage(stage)[1])}
    listed = {line.split(" = ")[0].strip() for line in out.splitlines() if line.startswith("  ") and " = " in line}
    assert keys <= listed and {"run.output_dir", "optim.lr", "data.max_tokens", "data.vision.video_fps"} <= keys
    defaults = dict(line.strip().split(" = ", 1) for line in out.splitlines() if " = " in line and line[2] != " ")
    assert defaults["optim.lr"] == "0.0002" and defaults["run.max_steps"] == "null"
    assert defaults["run.output_dir"] == f'"runs/{stage}"'
    assert "peak learning rate" in out  # the field's comment
    assert all(comment for _, _, comment in options.describe_keys(_stage(stage)[1]))  # every key says what it is
    # each listed line is a valid override giving the default back
    required = "teacher" if stage.startswith("distill") else "model"
    given = [f"{key}={value}" for key, value in defaults.items() if key != required]
    cfg = options.load(_stage(stage)[1], None, [f"{required}=m", *given])
    assert json.dumps(cfg.run.max_steps) == "null" and cfg.run.output_dir == f"runs/{stage}"


def test_convert_command(hf_teacher_dir, tmp_path, capsys):
    assert convert_main(["--teacher", str(hf_teacher_dir), "--out", str(tmp_path / "s"), "--sliding-window", "64"]) == 0
    assert "3 GDN + 2 sliding-window layers" in capsys.readouterr().out
    m = InfiniteVL.from_pretrained(tmp_path / "s")
    assert m.config.text.sliding_window == 64
    with pytest.raises(SystemExit):
        convert_main(["--teacher", str(tmp_path / "s"), "--out", str(tmp_path / "t")])  # not a Qwen2.5-VL dir


def test_config_values_of_the_wrong_type_name_the_key(tmp_path):
    sft = _stage("sft")[1]
    for text, message in [("data: [1, 2]", r"data must be a section of keys \(train, "),
                          ("data: {vision: 5}", r"data.vision must be a section of keys"),
                          ("run: {epochs: [1]}", r"run.epochs must be a number, got \[1\]"),
                          ("run: {bf16: 2}", r"run.bf16 must be true or false"),
                          ("run: {grad_accum: 2.5}", r"run.grad_accum must be a whole number"),
                          ("run: {max_steps: abc}", r"run.max_steps must be a whole number or null"),
                          ("run: {grad_accum: null}", r"run.grad_accum must be a whole number, got null"),
                          ("optim: {betas: 0.9}", r"optim.betas must be a list"),
                          # right type, impossible value
                          ("optim: {betas: [0.9]}", r"optim.betas must be two numbers"),
                          ("optim: {lr: -1}", r"optim.lr must be > 0"),
                          ("optim: {max_grad_norm: -1}", r"optim: .*max_grad_norm must be >= 0"),
                          ("run: {log_every: 0}", r"run.log_every must be >= 1"),
                          ("run: {save_every: 0}", r"run.save_every must be >= 1"),
                          ("run: {keep_last: -1}", r"run.keep_last must be >= 0"),
                          ("run: {max_steps: 0}", r"run.max_steps must be >= 1, or null")]:
        (tmp_path / "c.yaml").write_text(text + "\nmodel: m\n")
        with pytest.raises(ValueError, match=f"c.yaml: {message}"):
            options.load(sft, tmp_path / "c.yaml")
    # what YAML gives for numbers and a single path is taken as meant
    (tmp_path / "c.yaml").write_text("model: m\ndata: {train: one.jsonl, system_prompt: null}\noptim: {lr: 1e-4}\n"
                                     "run: {grad_accum: '4', output_dir: 2024, max_steps: 1e3, bf16: 0}\n")
    cfg = options.load(sft, tmp_path / "c.yaml")
    assert cfg.data.train == ["one.jsonl"] and cfg.optim.lr == 1e-4
    assert cfg.data.system_prompt is None and cfg.run.bf16 is False
    assert (cfg.run.grad_accum, cfg.run.output_dir, cfg.run.max_steps) == (4, "2024", 1000)


def test_a_missing_config_file_is_named_in_the_error(capsys):
    with pytest.raises(SystemExit):
        train_main(["sft"])  # no --config: every key has its default, so model is empty
    err = capsys.readouterr().err
    assert "model is empty" in err and "--config configs/sft.yaml" in err


def test_convert_keeps_an_existing_directory_unless_forced(hf_teacher_dir, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        convert_main(["--teacher", str(hf_teacher_dir), "--out", str(out)])
    assert "not empty" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):  # the teacher's own directory is never the output
        convert_main(["--teacher", str(hf_teacher_dir), "--out", str(hf_teacher_dir), "--force"])
    assert convert_main(["--teacher", str(hf_teacher_dir), "--out", str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and InfiniteVL.from_pretrained(out).config.text.sliding_window == 8192
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no .partial / .old left behind
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    help_text = capsys.readouterr().out
    assert "i % attention_every" in help_text and "(default: 8192)" in help_text


def test_a_device_that_is_not_there_is_a_config_error():
    from infinitevl.training import distributed

    with pytest.raises(ValueError, match="run.device: unknown device 'gpu'"):
        distributed.init("gpu")


def test_convert_rejects_impossible_shapes(tmp_path, capsys):
    for flag, value in (("--norm-eps", "-1"), ("--sliding-window", "0"), ("--num-linear-heads", "0")):
        with pytest.raises(SystemExit):
            convert_main(["--teacher", str(tmp_path), "--out", str(tmp_path / "s"), flag, value])
        assert flag.lstrip("-").replace("-", "_") in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_convert_into_the_empty_working_folder_and_through_a_link(hf_teacher_dir, tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert convert_main(["--teacher", str(hf_teacher_dir), "--out", "."]) == 0
    assert (here / "config.json").exists() and Path.cwd() == here
    target = tmp_path / "real"
    target.mkdir()
    (target / "old.txt").write_text("x")
    (tmp_path / "link").symlink_to(target)
    assert convert_main(["--teacher", str(hf_teacher_dir), "--out", str(tmp_path / "link"), "--force"]) == 0
    assert (tmp_path / "link").is_symlink() and (target / "config.json").exists() and not (target / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "link", "real"]


def test_config_errors_blame_the_override_only_when_it_gave_the_value(tmp_path):
    import yaml

    dl, lsft = _stage("distill-layer")[1], _stage("long-sft")[1]
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"teacher": "/x", "spec": {"num_linear_heads": 0}, "run": {"sed": 1}}))
    with pytest.raises(ValueError, match=r"^.*c\.yaml: unknown key\(s\) \['sed'\]"):
        options.load(dl, f, ["run.seed=3"])  # a typo in the file, a good override beside it
    f.write_text(yaml.safe_dump({"teacher": "/x", "spec": {"num_linear_heads": 0}}))
    with pytest.raises(ValueError, match=r"^.*c\.yaml: spec.num_linear_heads must be >= 1"):
        options.load(dl, f, ["teacher=/y"])
    f.write_text(yaml.safe_dump({"model": "/x", "lora": {"alpha": 8}}))
    with pytest.raises(ValueError, match=r"^--set lora.dropout: lora.dropout must be in \[0, 1\)"):
        options.load(lsft, f, ["lora.r=8", "lora.dropout=2"])
    with pytest.raises(ValueError, match=r"^--set data.train: data.train\[0\].path must be a path"):
        options.load(lsft, f, ["data.train=[{path: null}]"])
