"""The training benchmark's --tiny mode runs on CPU end to end (gate, steps, falling loss, FLOP count,
table, JSON line, the profiled step)."""
import importlib.util
import json

import torch

from ..conftest import ROOT


def test_bench_train_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--tiny", "--out", str(tmp_path), "--warmup", "1", "--steps", "2", "--row-tokens", "128",
                      "--profile"])
    assert res["gate"]["passed"] and res["backend"] == "torch"
    assert res["losses"][-1] < res["losses"][0] and len(res["step_ms"]) == 2
    assert res["tokens_per_s_per_gpu"] > 0 and res["samples_per_row"] >= 1
    n = res["matmul_params"]
    assert res["flops_per_token"]["dense"] == 6 * n  # full-parameter training: 6N
    assert json.loads((tmp_path / "results.json").read_text())["row_tokens"] == 128
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "train" and last["shape"] == "tiny"
    # --profile: one more step's time by kind (on CPU: the aten operators' own time), the largest ones listed
    kinds = res["breakdown_ms"]
    assert kinds["matmul"] > 0 and kinds["top_kernels"] and all(t >= 0 for t, _ in kinds["top_kernels"])


def test_flops_count_frozen_weights_once_less():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from infinitevl import InfiniteVL, preset
    from infinitevl.training.params import set_trainable

    m = InfiniteVL(preset("tiny"))
    set_trainable(m, ["gdn"])
    n_all, n_tr = bench.matmul_params(m, trained_only=False), bench.matmul_params(m, trained_only=True)
    assert 0 < n_tr < n_all
    swa, gdn = bench.attention_flops_per_token(m.config, [10, 100])
    assert swa > 0 and gdn > 0


def test_benchmark_rows_hold_no_vision_tokens():
    """Random text rows must not contain image/video placeholders (a 64-row step at the 4B shape once drew one
    and the model rightly refused a placeholder without pixels)."""
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from infinitevl import preset

    for name in ("tiny", "4b"):
        cfg = preset(name)
        special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
        vocab = bench.text_vocab(cfg)
        assert vocab <= min(special)
        ids = torch.cat([bench.packed_row(i, tokens=8192, vocab=vocab, min_len=1024, max_len=4096).input_ids
                         for i in range(4)])
        assert not set(ids.unique().tolist()) & special
