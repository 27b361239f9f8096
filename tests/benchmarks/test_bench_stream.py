"""The streaming benchmark's --tiny mode runs on CPU end to end (gate, windows, batched streams, breakdown,
plot, JSON line)."""
import importlib.util
import json

from ..conftest import ROOT


def test_bench_stream_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_stream", ROOT / "benchmarks" / "bench_stream.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--tiny", "--out", str(tmp_path), "--frames", "12", "--window", "4", "--streams", "2",
                      "--steps", "2", "--frame-size", "28", "--frames-per-step", "2", "3"])
    assert res["gate"]["passed"]
    assert [w["frames"] for w in res["single"]["windows"]] == [4, 8, 12]
    assert res["single"]["clip"] == 2 and res["single"]["graphs"] == []  # CPU: eager
    assert res["single_by_clip"][3] > 0  # windows of 3 (4 rounded down to whole clips)
    assert all(w["fps"] > 0 for w in res["single"]["windows"])
    assert res["many"][0]["streams"] == 2 and res["many"][0]["fps_aggregate"] > 0
    assert (tmp_path / "stream.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["tokens_per_frame"] == 1
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "stream" and last["frames"] == 12
