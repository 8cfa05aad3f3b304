"""benchmarks/bench.py runs end to end in its smoke mode and reports what it promises,
and refuses bad arguments before any work."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import COMMON_BAD_ARGS


ROOT = Path(__file__).resolve().parents[1]


def _strict_json(text):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


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
    record = _strict_json(record_path.read_text())
    assert record["environment"]["device"] == "cpu"
    layer = {r["layer"]: r for r in record["layer"]["rows"]}
    assert layer["torch.nn.GRU"]["fwd_bwd_vs_nn"] == 1.0
    assert all(r["forward_tokens_per_sec"] > 0 and r["fwd_bwd_tokens_per_sec"] > 0
               for r in layer.values())
    # --smoke: modes book and eager, for each implementation.
    rows = {(r["impl"], r["mode"]): r for r in record["train"]["rows"]}
    assert sorted(rows) == [(impl, mode) for impl in ("fused", "fused_scratch", "nn", "scratch")
                            for mode in ("book", "eager")]
    assert rows["scratch", "book"]["vs_scratch"] == 1.0 and rows["nn", "book"]["vs_nn"] == 1.0
    for (impl, mode), r in rows.items():
        assert r["mode_run"] == mode
        assert len(r["history"]["perplexity"]) == 2 and r["train_tokens_per_sec"] > 0
        assert r["train_tokens_per_sec_best_epoch"] >= r["train_tokens_per_sec"]
        # The sync-free step computes the book's numbers exactly.
        assert r["history"]["perplexity"] == rows[impl, "book"]["history"]["perplexity"]
    network = {r["impl"]: r for r in record["train"]["network"]}
    assert sorted(network) == ["fused", "fused_scratch", "nn", "scratch"]
    assert network["nn"]["vs_nn"] == 1.0
    assert all(r["fwd_bwd_tokens_per_sec"] > 0 for r in network.values())


def test_bench_train_modes_smoke(tmp_path, text_path):
    """The training table with --modes: compile compiles before the timed epochs and
    follows the book's perplexity; cuda-graphs on the CPU says it ran eagerly; every row
    has its ratio to the book's nn.GRU loop of the same run."""
    out = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--no-progress",
           "--part", "train", "--impls", "nn", "fused", "--modes", "book", "compile",
           "cuda-graphs", "--device", "cpu", "--threads", "1", "--data", str(text_path),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| FusedGRU | compile | " in proc.stdout
    assert "| FusedGRU | cuda-graphs (ran eager) | " in proc.stdout
    assert "--cuda-graphs: CUDA graphs need a CUDA device" in proc.stderr

    [record_path] = out.glob("bench-*.json")
    record = _strict_json(record_path.read_text())
    rows = {(r["impl"], r["mode"]): r for r in record["train"]["rows"]}
    assert len(rows) == 6
    for (impl, mode), r in rows.items():
        assert r["mode_run"] == ("eager" if mode == "cuda-graphs" else mode)
        assert r["vs_nn"] == r["train_tokens_per_sec"] / rows["nn", "book"]["train_tokens_per_sec"]
        assert "vs_scratch" not in r  # the scratch GRU's book loop was not run
        book = rows[impl, "book"]["history"]["perplexity"]
        assert r["history"]["perplexity"] == pytest.approx(book, rel=0.01)
    assert rows["fused", "compile"]["setup_seconds"] > 0


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


# --- The command line refuses bad arguments before any work (exit status 2) -----------

@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench.py as a module, for in-process main(argv) calls."""
    spec = importlib.util.spec_from_file_location("gru_fused_bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_benchmarking(bench, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("benchmarking started despite a bad argument")

    for name in ("layer_benchmark", "train_benchmark", "net_fwd_bwd"):
        monkeypatch.setattr(bench, name, refuse)
    monkeypatch.setattr(bench.tm_train, "run", refuse)


BAD_BENCH_ARGS = COMMON_BAD_ARGS + [
    (["--modes", "fast"], "--modes", "invalid choice: 'fast'"),
    (["--min-run-time", "0"], "--min-run-time", "> 0"),
    (["--min-run-time", "-1"], "--min-run-time", "> 0"),
]


def _assert_refused(bench, argv, arg, text, capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert time.perf_counter() - start < 5
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python benchmarks/bench.py: error: argument {arg}: "), err[-1]
    assert text in err[-1], err[-1]


@pytest.mark.parametrize("extra, arg, text", BAD_BENCH_ARGS,
                         ids=[" ".join(a[0]) for a in BAD_BENCH_ARGS])
def test_bench_bad_argument_exits_2_before_any_work(extra, arg, text, bench, no_benchmarking,
                                                    tmp_path, text_path, capsys):
    out = tmp_path / "runs"
    argv = ["--device", "cpu", "--no-progress", "--data", str(text_path), "--out", str(out),
            *extra]
    _assert_refused(bench, argv, arg, text, capsys)
    assert not out.exists()


def test_bench_bad_data_exits_2_before_the_layer_benchmark(bench, no_benchmarking, tmp_path,
                                                           capsys):
    bad = tmp_path / "timemachine.txt"
    bad.write_text("not the book")
    out = tmp_path / "runs"
    argv = ["--device", "cpu", "--no-progress", "--data", str(bad), "--out", str(out)]
    _assert_refused(bench, argv, "--data", "SHA-1", capsys)
    assert not out.exists()


@pytest.mark.parametrize("case", ["existing file", "parent is a file"])
def test_bench_unusable_out_exits_2_before_any_work(case, bench, no_benchmarking, tmp_path,
                                                    text_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    out = a_file if case == "existing file" else a_file / "runs"
    argv = ["--device", "cpu", "--no-progress", "--data", str(text_path), "--out", str(out)]
    _assert_refused(bench, argv, "--out", str(out), capsys)


def test_bench_help_shows_defaults(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 50)", "(default: 32)", "(default: 35)", "(default: 1.0)",
                    "(default: runs)", "(default: all)"):
        assert default in help_text
    assert "1. Layer (issue 2)" in help_text  # the description is still there
