"""GPU-only benchmark scripts stop with `error:` naming what they need (exit 2) on a machine without it, and
their --help still prints what they measure."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
GPU_ONLY = ["bench_block_attention", "bench_gemv", "bench_short_conv", "probe_fp8", "bench_train_conv",
            "bench_train_norm", "bench_train_swiglu", "profile_steps", "profile_stream", "probe_overlap"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU these scripts run (tests/gpu covers the kernels)")
@pytest.mark.parametrize("script", GPU_ONLY)
def test_gpu_only_scripts_stop_clearly_without_a_gpu(script):
    run = subprocess.run([sys.executable, str(BENCH / f"{script}.py")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith(f"error: {script}.py needs a CUDA GPU"), run.stderr
    assert "Traceback" not in run.stderr
    if script == "bench_gemv":
        helped = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--help"], capture_output=True,
                                text=True, timeout=120)
        assert helped.returncode == 0 and "cuBLAS" in helped.stdout and "needs a CUDA GPU" in helped.stdout
