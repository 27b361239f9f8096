"""`infinitevl eval`: exact-match accuracy on a chat-format file, answers equal to answering each record alone."""
from __future__ import annotations

import json

import pytest

from infinitevl import cli


@pytest.fixture(scope="module")
def test_file(tmp_path_factory):
    from .training.conftest import synthetic_task

    out = tmp_path_factory.mktemp("eval")
    synthetic_task().make_split(out, "test", 10, seed=5)
    return out / "test.jsonl"


def test_eval_answers_like_the_evaluation_helper(test_file, tmp_path, capsys):
    from infinitevl import InfiniteVL
    from infinitevl.training.data import DataConfig, chat_format_for, read_records
    from infinitevl.training.evaluate import answer

    out = tmp_path / "answers.jsonl"
    assert cli.main(["eval", "--data", str(test_file), "--batch-size", "3", "--group-by", "task", "--out", str(out),
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["records"] == len(rows) == 10 and result["correct"] == sum(r["correct"] for r in rows)
    tasks = [json.loads(line)["task"] for line in test_file.read_text().splitlines()]
    assert [r["task"] for r in rows] == tasks and set(result["by_task"]) == set(tasks)
    model = InfiniteVL.from_pretrained(cli.DEFAULT_MODEL)
    fmt = chat_format_for(cli.DEFAULT_MODEL, model.config, DataConfig(max_tokens=4096))
    alone = [answer(model, fmt, rec, max_new_tokens=64) for rec in read_records(test_file)]
    assert [(r["answer"], r["expected"]) for r in rows] == alone
    assert result["accuracy"] >= 0.8  # the shipped model knows this task


def test_eval_limits_and_bad_input(test_file, tmp_path, capsys):
    assert cli.main(["eval", "--data", str(test_file), "--limit", "2"]) == 0
    assert "/2 = " in capsys.readouterr().out  # exact match: k/2 = ...%
    assert cli.main(["eval", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    assert cli.main(["eval", "--data", str(bad)]) == 2
    assert "bad.jsonl:line 1" in capsys.readouterr().err
    for flags, message in ((["--limit", "0"], "--limit must be >= 1"), (["--out", str(tmp_path)], "is a folder")):
        with pytest.raises(SystemExit):
            cli.main(["eval", "--data", str(test_file), *flags])
        assert message in capsys.readouterr().err


def test_eval_reads_images_at_the_checkpoints_budget():
    """The pixel bounds of the checkpoint's preprocessor_config.json (what generate and serve use), not the
    training defaults."""
    from infinitevl.cli_eval import image_budget
    from infinitevl.training.vision_inputs import VisionInputConfig

    got = image_budget(cli.DEFAULT_MODEL, VisionInputConfig())
    config = json.loads((cli.DEFAULT_MODEL / "preprocessor_config.json").read_text())
    assert (got.image_min_pixels, got.image_max_pixels) == (config["min_pixels"], config["max_pixels"])
    assert got.image_max_pixels != VisionInputConfig().image_max_pixels
