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


def test_cpu_sweep_smoke(tmp_path):
    """benchmarks/cpu_sweep.py --smoke prints its three tables and measures what it says:
    FusedGRU's saved-for-backward bytes are within the issue's bound (outputs plus
    4*T*B*H values) and below nn.GRU's, and one thread uses about one core."""
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cpu_sweep.py"), "--smoke",
           "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for title in ("## Time machine layer: one-hot I=28, H=256, B=32, T=35, float32",
                  "## Memory saved for backward", "## Sweep, I = H, dense input, float32"):
        assert title in proc.stdout
    assert proc.stdout.count("environment: torch ") == 3

    result = json.loads(out.read_text())
    mem = result["memory"]
    T, B, H = 35, 32, 256
    assert mem["bound"] == 4 * 5 * T * B * H
    assert mem["fused"] <= mem["bound"] < mem["nn"]
    [row] = result["time_machine"]["rows"]
    assert row["threads"] == 1 and row["cpu_over_wall_fb"] < 1.5
    for key in ("nn_fwd", "fused_fwd", "nn_fb", "fused_fb", "floor_fwd", "floor_fb"):
        assert row[key] > 0
    points = result["sweep"]["1"]
    assert [(p["H"], p["B"], p["T"]) for p in points] == [(16, 1, 5), (16, 4, 5)]
