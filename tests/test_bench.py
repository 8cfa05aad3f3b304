"""benchmarks/bench.py runs end to end in its smoke mode and reports what it promises."""
import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path, text_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--no-progress",
           "--device", "cpu", "--threads", "1", "--data", str(text_path), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stdout = proc.stdout

    # Both tables, each with its environment line.
    assert "## GRU layer: one-hot input I=28, H=256, B=32, T=35, float32" in stdout
    assert "## Time machine: 2 epochs, H=16" in stdout
    assert stdout.count("environment: torch ") == 2
    for name in ("torch.nn.GRU", "reference.gru_layer", "FusedGRU", "d2l scratch (Python loop)",
                 "d2l scratch, fused op"):
        assert f"| {name} |" in stdout

    [record_path] = out.glob("bench-*.json")
    assert len(list(out.glob("bench-*.png"))) == 1
    record = json.loads(record_path.read_text())
    assert record["environment"]["device"] == "cpu"
    layer = {r["layer"]: r for r in record["layer"]["rows"]}
    assert layer["torch.nn.GRU"]["fwd_bwd_vs_nn"] == 1.0
    assert all(r["forward_tokens_per_sec"] > 0 and r["fwd_bwd_tokens_per_sec"] > 0
               for r in layer.values())
    rows = {r["impl"]: r for r in record["train"]["rows"]}
    assert sorted(rows) == ["fused", "fused_scratch", "nn", "scratch"]
    assert rows["scratch"]["train_vs_scratch"] == 1.0 and rows["nn"]["train_vs_nn"] == 1.0
    for r in rows.values():
        assert len(r["history"]["perplexity"]) == 2
        assert r["train_tokens_per_sec"] > 0 and r["layer_fwd_bwd_tokens_per_sec"] > 0
