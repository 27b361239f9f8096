"""The serving benchmark's --tiny mode runs on CPU end to end (gate, rounds, table, JSON line)."""
import importlib.util
import json

from ..conftest import ROOT


def test_bench_serve_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--tiny", "--out", str(tmp_path), "--requests", "2", "--new-tokens", "3", "--repeats", "1"])
    assert res["gate"]["passed"] and res["gate"]["tokens"] > res["gate"]["requests"]
    (row,) = res["rows"]
    assert row["requests"] == 2 and row["batched_s"] > 0 and row["sequential_s"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == res["rows"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "serve"
