"""Two CPU processes under torchrun (gloo), DDP and FSDP2, give the losses of one process that
accumulates the same rows: the entry point is the same (`python -m infinitevl.cli_train train ...`). FSDP2 also
through the fused training projections (which save the unsharded parameters themselves for backward)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from infinitevl.cli_train import train_main

from .conftest import TINY_ASSET


def _config(synth_dir, tmp_path, name: str, accum: int, parallel: str):
    cfg = {
        "model": str(TINY_ASSET), "trainable": ["gdn", "attention", "mlp"],
        "data": {"train": [str(synth_dir / "train.jsonl")], "max_tokens": 512, "row_tokens": 160,
                 "vision": {"image_max_pixels": 12544}},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "run": {"output_dir": str(tmp_path / name), "max_steps": 2, "grad_accum": accum, "progress": False,
                "log_every": 1, "bf16": False, "gradient_checkpointing": False, "parallel": parallel},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(synth_dir, tmp_path_factory):
    """One process accumulating 2 rows per step, and 2 processes x 1 row with DDP and with FSDP2, and with FSDP2
    through the training's fused projections (dist_worker.py --fused)."""
    tmp = tmp_path_factory.mktemp("dist")
    assert train_main(["sft", "--config", str(_config(synth_dir, tmp, "one", 2, "none"))]) == 0
    worker = Path(__file__).with_name("dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(_config(synth_dir, tmp, "ddp", 1, "ddp")), str(_config(synth_dir, tmp, "fsdp", 1, "fsdp")),
           "--fused", str(_config(synth_dir, tmp, "fsdp_fused", 1, "fsdp"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own session, so a hang can be ended with the workers (torchrun's children) included.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("torchrun timed out:\n" + out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    (tmp / "torchrun.log").write_text(out)
    return tmp


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "fsdp_fused"])
def test_two_processes_match_one(runs, parallel):
    if parallel == "fsdp_fused":  # the fused projections did run
        calls = [int(line.split(":")[1]) for line in (runs / "torchrun.log").read_text().splitlines()
                 if line.startswith("fused projection calls:")]
        assert calls and calls[0] > 0
    one, two = _losses(runs / "one"), _losses(runs / parallel)
    assert len(one) == len(two) == 2
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-6)
    wa = load_file(str(runs / "one/final/model.safetensors"))
    wb = load_file(str(runs / parallel / "final/model.safetensors"))
    assert wa.keys() == wb.keys()
    # Adam turns rounding-level gradient differences on near-zero gradients into steps of up to lr.
    diff = torch.cat([(wb[k] - wa[k]).abs().flatten() for k in wa])
    assert diff.max() <= 2e-3 and (diff > 1e-5).float().mean() < 1e-3, (diff.max(), (diff > 1e-5).float().mean())
