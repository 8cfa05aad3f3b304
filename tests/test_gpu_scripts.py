"""The GPU check's scripts, exercised where they can be without a GPU: gpu_check.sh's
syntax, its phases and sanitizer flags, and its control flow end to end with stand-ins
for python and compute-sanitizer; the benchmark's code path in its CPU smoke mode; the
sanitizers' kernel filter against the kernels actually built."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gru_fused

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
KERNEL_FILTER = "kns=gru_fused"


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_phases_and_flags():
    """Numbers first (build, bench, tests, then the sanitizers); memcheck and initcheck
    without PyTorch's caching allocator; racecheck, synccheck and initcheck on our kernels
    only; every sanitizer fails the phase on an error; each phase reports its time."""
    text = SCRIPT.read_text()
    phases = re.findall(r"^\s*run_phase (\w+) (\S+) (.*)$", text, re.M)
    names = [name for name, _, _ in phases]
    assert names == ["build", "bench", "bench", "train", "tests", "memcheck", "racecheck",
                     "synccheck", "initcheck"]
    commands = {name: command for name, _, command in phases}
    assert commands["memcheck"].startswith("sanitize off memcheck")
    assert commands["initcheck"].startswith("sanitize off initcheck")
    assert commands["racecheck"].startswith("sanitize on racecheck")
    assert commands["synccheck"].startswith("sanitize on synccheck")
    for tool in ("racecheck", "synccheck", "initcheck"):
        assert commands[tool].endswith(f"--kernel-name {KERNEL_FILTER}"), tool
    assert "env PYTORCH_NO_CUDA_MEMORY_CACHING=1" in text
    assert "--error-exitcode 1" in text
    assert "export PYTHONUNBUFFERED=1" in text
    assert 'echo "[$name] $took s: $verdict"' in text
    # The training benchmark in every mode (issue 14), the per-kernel table (issue 12).
    assert ("benchmarks/bench.py --part train" in text
            and "--modes book eager compile cuda-graphs" in text)
    assert "gpu_bench.py --quick --per-kernel" in text and "gpu_bench.py --per-kernel" in text
    assert "--quick" in text and "gpu_bench.py --quick" in text


def _fake_tools(tmp_path, sleep_build=0):
    """A checkout holding only the script, a python stand-in that answers each of the
    script's commands and a compute-sanitizer stand-in that runs its target."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "benchmarks")
    (repo / "data").mkdir()
    (repo / "data" / "timemachine.txt").write_text("text\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text(f"""#!/usr/bin/env bash
echo "python $*" >> "{tmp_path}/calls"
case "$*" in
  *"setup.py build_ext"*) sleep {sleep_build}; echo built ;;
  -c*) echo imported ;;
  *gpu_bench.py*) echo "environment: {{}}"; echo "progress"; echo;
                  echo "Benchmark, float32, one layer"; echo "table" ;;
  *bench.py*) echo "train table" ;;
  *"-m pytest"*) echo "tests ran"; exit "${{TESTS_RC:-0}}" ;;
  *gpu_small.py*) echo "caching=${{PYTORCH_NO_CUDA_MEMORY_CACHING-on}}" ;;
  *) echo "unexpected: $*"; exit 3 ;;
esac
""")
    sanitizer = bin_dir / "compute-sanitizer"
    sanitizer.write_text(f"""#!/usr/bin/env bash
echo "compute-sanitizer $* caching=${{PYTORCH_NO_CUDA_MEMORY_CACHING-on}}" >> "{tmp_path}/calls"
while [ "$1" != --error-exitcode ]; do shift; done
shift 2
exec "$@"
""")
    for tool in (python, sanitizer):
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python)}
    env.pop("GRU_FUSED_DATA", None)
    env.pop("PYTORCH_NO_CUDA_MEMORY_CACHING", None)
    return repo, env


def _run_script(repo, env, *args):
    return subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_gpu_check_runs_every_phase_in_order(tmp_path):
    repo, env = _fake_tools(tmp_path)
    run = _run_script(repo, env, str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout + run.stderr
    reported = re.findall(r"^\[(\w+)\] \d+ s: ok$", run.stdout, re.M)
    assert reported == ["build", "bench", "train", "tests", "memcheck", "racecheck",
                        "synccheck", "initcheck"]
    assert "Benchmark, float32" in run.stdout and "progress" not in run.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    sanitized = [c for c in calls if c.startswith("compute-sanitizer")]
    assert [c.split()[2] for c in sanitized] == ["memcheck", "racecheck", "synccheck",
                                                 "initcheck"]
    caching = {c.split()[2]: c.split("caching=")[1] for c in sanitized}
    assert caching == {"memcheck": "1", "racecheck": "on", "synccheck": "on", "initcheck": "1"}
    assert all(f"--kernel-name {KERNEL_FILTER}" in c for c in sanitized[1:])
    assert any("--data" in c and "timemachine.txt" in c for c in calls)
    assert (tmp_path / "out" / "memcheck.log").read_text().strip() == "caching=1"


def test_gpu_check_quick_and_failures(tmp_path):
    """--quick: build, a short table, test_cuda.py, memcheck; a failing phase does not stop
    the next, and the exit status says it failed."""
    repo, env = _fake_tools(tmp_path)
    run = _run_script(repo, {**env, "TESTS_RC": "1"}, "--quick", str(tmp_path / "out"))
    assert run.returncode == 1, run.stdout + run.stderr
    reported = re.findall(r"^\[(\w+)\] \d+ s: (.*)$", run.stdout, re.M)
    assert reported == [("build", "ok"), ("bench", "ok"), ("tests", "failed (exit 1)"),
                        ("memcheck", "ok")]
    assert "gpu_check: FAILED: tests" in run.stdout
    calls = (tmp_path / "calls").read_text()
    assert "gpu_bench.py --quick" in calls and "bench.py --part train" not in calls
    assert re.search(r"-k cuda tests/test_cuda.py$", calls, re.M)


def test_gpu_check_keeps_to_its_budget(tmp_path):
    """A phase gets at most what is left of the budget; phases with no time left are
    skipped and count as failed."""
    repo, env = _fake_tools(tmp_path, sleep_build=3)
    run = _run_script(repo, {**env, "GPU_CHECK_BUDGET_S": "17"}, str(tmp_path / "out"))
    assert run.returncode == 1, run.stdout + run.stderr
    assert re.search(r"^\[build\] \d+ s: ok$", run.stdout, re.M)
    assert re.search(r"^\[bench\] skipped: \d+ s of the 17 s budget left$", run.stdout, re.M)
    assert "gpu_check: FAILED: bench train tests memcheck" in run.stdout


def test_gpu_bench_smoke_on_cpu(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device",
                          "cpu", "--smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "x = FusedGRU / nn.GRU" in run.stdout.splitlines()[-1]
    result = json.loads(out.read_text())
    assert set(result["environment"]["fp32_precision"]) == {"cudnn_rnn", "cuda_matmul"}
    rows = result["rows"]
    assert len(rows) == 2
    for row in rows:
        for key in ("fwd nn", "fwd fused", "fwd+bwd nn", "fwd+bwd fused"):
            assert row[key] > 0


def test_gpu_small_compiles():
    subprocess.run([sys.executable, "-m", "py_compile", str(ROOT / "benchmarks" / "gpu_small.py")],
                   check=True)


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


def test_sanitizer_filter_selects_every_kernel():
    """gpu_check.sh's --kernel-name kns=gru_fused (a substring of the mangled name) selects
    every kernel in the built extension: none escapes racecheck, synccheck, initcheck."""
    if not gru_fused.cuda_compiled():
        pytest.skip("gru_fused was built without its CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (the CUDA toolkit's, or triton's)")
    listing = subprocess.run([tool, "-symbols", gru_fused._C.__file__], capture_output=True,
                             text=True, check=True).stdout
    kernels = {line.split()[-1] for line in listing.splitlines() if "STO_ENTRY" in line}
    assert kernels, "no kernels found in " + gru_fused._C.__file__
    substring = KERNEL_FILTER.split("=", 1)[1]
    assert all(substring in k for k in kernels), sorted(k for k in kernels if substring not in k)
