"""The inference benchmark's --tiny mode runs on CPU end to end (gate, timings, table, plot, JSON line)."""
import importlib.util
import json

from ..conftest import ROOT


def test_bench_inference_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_inference", ROOT / "benchmarks" / "bench_inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--tiny", "--out", str(tmp_path), "--steps", "2", "--contexts", "64", "160",
                      "--batches", "1", "2"])
    assert res["gate"]["passed"]
    assert [r["context"] for r in res["ours_by_context"]] == [64, 160]
    assert all(r["decode_ms"] > 0 for r in res["ours_by_context"] + res["baseline_by_context"])
    assert (tmp_path / "decode.png").stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["ours_by_batch"][1]["batch"] == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["bench"] == "inference"
