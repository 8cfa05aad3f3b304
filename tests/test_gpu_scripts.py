"""The GPU check's scripts, exercised where they can be: syntax of the shell script, and
the GPU benchmark's code path in its CPU smoke mode (the GPU run needs a GPU)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


def test_gpu_bench_smoke_on_cpu(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device",
                          "cpu", "--smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "x = FusedGRU / nn.GRU" in run.stdout.splitlines()[-1]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    for row in rows:
        for key in ("fwd nn", "fwd fused", "fwd+bwd nn", "fwd+bwd fused"):
            assert row[key] > 0
