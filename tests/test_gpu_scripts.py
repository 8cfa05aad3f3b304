"""The GPU check's scripts, exercised where they can be without a GPU: gpu_check.sh's
syntax, its phases and sanitizer flags, and its control flow end to end with stand-ins
for python and compute-sanitizer, every kernel family in its tests and sanitizer phases;
the benchmark's code path in its CPU smoke mode and its kernel families table (dry run,
and with made-up measurements); the sanitizers' kernel filter against the kernels
actually built."""
import importlib.util
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
# Every concrete kernel family the extension has (GRU_FUSED_CUDA_KERNEL's values less the
# two that choose among them): the GPU check must test and sanitize each.
FAMILIES = [k for k in gru_fused.ops._KERNELS if k not in ("auto", "persistent")]
SANITIZERS = ["memcheck", "racecheck", "synccheck", "initcheck"]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_phases_and_flags():
    """Numbers first (build, bench, then per family the tests and the sanitizers); memcheck
    and initcheck without PyTorch's caching allocator; racecheck, synccheck and initcheck
    on our kernels only; every sanitizer fails the phase on an error; each phase reports
    its time; every kernel family is forced in turn."""
    assert FAMILIES == ["step", "cluster", "cooperative"]
    text = SCRIPT.read_text()
    phases = re.findall(r"^\s*run_phase (\S+) (\S+) (.*)$", text, re.M)
    names = [name for name, _, _ in phases]
    assert names == ["build", "bench", "bench", "train", '"tests-$f"', '"memcheck-$f"',
                     '"racecheck-$f"', '"synccheck-$f"', '"initcheck-$f"']
    commands = {name.strip('"').split("-")[0]: command for name, _, command in phases}
    assert commands["tests"] == 'tests "$f"'
    assert commands["memcheck"].startswith('sanitize "$f" off memcheck')
    assert commands["initcheck"].startswith('sanitize "$f" off initcheck')
    assert commands["racecheck"].startswith('sanitize "$f" on racecheck')
    assert commands["synccheck"].startswith('sanitize "$f" on synccheck')
    for tool in ("racecheck", "synccheck", "initcheck"):
        assert commands[tool].endswith(f"--kernel-name {KERNEL_FILTER}"), tool
    assert re.search(r"^families=\((.*)\)$", text, re.M).group(1).split() == FAMILIES
    assert 'GRU_FUSED_CUDA_KERNEL="$family"' in text
    assert "gpu_bench.py --check-family" in text
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
echo "python $* kernel=${{GRU_FUSED_CUDA_KERNEL-unset}}" >> "{tmp_path}/calls"
case "$*" in
  *"setup.py build_ext"*) sleep {sleep_build}; echo built ;;
  -c*) echo imported ;;
  *"gpu_bench.py --check-family"*) echo "check-family: every call ran the planned kernels" ;;
  *gpu_bench.py*) echo "environment: {{}}"; echo "progress"; echo;
                  echo "Benchmark, float32, one layer"; echo "table" ;;
  *bench.py*) echo "train table" ;;
  *"-m pytest"*) echo "tests ran"
                 if [ "${{GRU_FUSED_CUDA_KERNEL-}}" = "${{TESTS_FAIL_FAMILY-none}}" ]; then exit 1; fi
                 exit "${{TESTS_RC:-0}}" ;;
  *gpu_small.py*) echo "caching=${{PYTORCH_NO_CUDA_MEMORY_CACHING-on}} kernel=${{GRU_FUSED_CUDA_KERNEL-unset}}" ;;
  *) echo "unexpected: $*"; exit 3 ;;
esac
""")
    sanitizer = bin_dir / "compute-sanitizer"
    sanitizer.write_text(f"""#!/usr/bin/env bash
echo "compute-sanitizer $* caching=${{PYTORCH_NO_CUDA_MEMORY_CACHING-on}} kernel=${{GRU_FUSED_CUDA_KERNEL-unset}}" >> "{tmp_path}/calls"
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


def _fields(call):
    """"key=value" words of a logged call, as a dict."""
    return dict(w.split("=", 1) for w in call.split() if "=" in w and not w.startswith("-"))


def test_gpu_check_runs_every_phase_in_order(tmp_path):
    repo, env = _fake_tools(tmp_path)
    run = _run_script(repo, env, str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout + run.stderr
    reported = re.findall(r"^\[([\w-]+)\] \d+ s: ok$", run.stdout, re.M)
    assert reported == (["build", "bench", "train"] + [f"tests-{f}" for f in FAMILIES]
                        + [f"memcheck-{f}" for f in FAMILIES]
                        + [f"{tool}-{f}" for f in FAMILIES
                           for tool in ("racecheck", "synccheck", "initcheck")])
    assert "Benchmark, float32" in run.stdout and "progress" not in run.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    sanitized = [c for c in calls if c.startswith("compute-sanitizer")]
    # Every sanitizer on every family, each with the family forced.
    assert sorted((c.split()[2], _fields(c)["kernel"]) for c in sanitized) == sorted(
        (tool, f) for tool in SANITIZERS for f in FAMILIES)
    for c in sanitized:
        caching = _fields(c)["caching"]
        assert caching == ("1" if c.split()[2] in ("memcheck", "initcheck") else "on"), c
        assert (f"--kernel-name {KERNEL_FILTER}" in c) == (c.split()[2] != "memcheck"), c
    # The tests once per family, after a check that the family's kernels are what runs.
    pytest_calls = [c for c in calls if "-m pytest" in c]
    assert [_fields(c)["kernel"] for c in pytest_calls] == FAMILIES
    checks = [c for c in calls if "--check-family" in c]
    assert [_fields(c)["kernel"] for c in checks] == FAMILIES
    assert all(f"tests-{f}.xml" in c for f, c in zip(FAMILIES, pytest_calls))
    # The benchmark and the build leave the family to auto.
    assert all(_fields(c)["kernel"] == "unset" for c in calls
               if "setup.py" in c or ("gpu_bench.py" in c and "--check-family" not in c))
    assert any("--data" in c and "timemachine.txt" in c for c in calls)
    for f in FAMILIES:
        assert (tmp_path / "out" / f"memcheck-{f}.log").read_text().strip() == \
            f"caching=1 kernel={f}"


def test_gpu_check_quick_and_failures(tmp_path):
    """--quick: build, a short table, per family test_cuda.py and memcheck; a failing phase
    does not stop the next, and the exit status says it failed."""
    repo, env = _fake_tools(tmp_path)
    run = _run_script(repo, {**env, "TESTS_FAIL_FAMILY": "cluster"}, "--quick",
                      str(tmp_path / "out"))
    assert run.returncode == 1, run.stdout + run.stderr
    reported = re.findall(r"^\[([\w-]+)\] \d+ s: (.*)$", run.stdout, re.M)
    assert reported == ([("build", "ok"), ("bench", "ok")]
                        + [(f"tests-{f}", "failed (exit 1)" if f == "cluster" else "ok")
                           for f in FAMILIES]
                        + [(f"memcheck-{f}", "ok") for f in FAMILIES])
    assert "gpu_check: FAILED: tests-cluster" in run.stdout
    calls = (tmp_path / "calls").read_text()
    assert "gpu_bench.py --quick" in calls and "bench.py --part train" not in calls
    assert len(re.findall(r"-k cuda tests/test_cuda.py kernel=\w+$", calls, re.M)) == \
        len(FAMILIES)
    assert "racecheck" not in calls


def test_gpu_check_keeps_to_its_budget(tmp_path):
    """A phase gets at most what is left of the budget; phases with no time left are
    skipped and count as failed."""
    repo, env = _fake_tools(tmp_path, sleep_build=3)
    run = _run_script(repo, {**env, "GPU_CHECK_BUDGET_S": "17"}, str(tmp_path / "out"))
    assert run.returncode == 1, run.stdout + run.stderr
    assert re.search(r"^\[build\] \d+ s: ok$", run.stdout, re.M)
    assert re.search(r"^\[bench\] skipped: \d+ s of the 17 s budget left$", run.stdout, re.M)
    skipped = ["bench", "train"] + [f"tests-{f}" for f in FAMILIES] + [
        f"{tool}-{f}" for tool in SANITIZERS[:1] for f in FAMILIES] + [
        f"{tool}-{f}" for f in FAMILIES for tool in SANITIZERS[1:]]
    assert f"gpu_check: FAILED: {' '.join(skipped)}" in run.stdout


def test_gpu_check_quick_budget_fits_eight_minutes():
    """--quick's default budget and its phases' caps: the whole run within 8 minutes."""
    text = SCRIPT.read_text()
    budget = int(re.search(r'quick" -eq 1 \]; then budget="\$\{GPU_CHECK_BUDGET_S:-(\d+)\}"',
                           text).group(1))
    assert budget <= 8 * 60


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


def _family_table_columns(text):
    header = next(line for line in text.splitlines() if line.startswith("| I, H, B, T, dtype"))
    return [c.strip() for c in header.strip("|").split("|")]


def test_gpu_bench_family_shapes_and_columns():
    """The families table's grid (the book's shape; H in {256, 1024} x B in {1, 8, 32, 256}
    x T in {35, 256}; float32 and bfloat16), its families, and a column per family and
    cuDNN, forward and backward."""
    bench = _load("gpu_bench")
    assert set(bench.FAMILIES) == {"step", "persistent"}
    assert bench.FAMILIES["persistent"] == "persistent" and bench.FAMILIES["step"] == "step"
    want = {(28, 256, 32, 35, dt) for dt in ("float32", "bfloat16")} | {
        (H, H, B, T, dt) for H in (256, 1024) for B in (1, 8, 32, 256) for T in (35, 256)
        for dt in ("float32", "bfloat16")}
    assert set(bench.FAMILY_SHAPES) == want
    assert set(bench.FAMILY_QUICK_SHAPES) <= want and len(bench.FAMILY_QUICK_SHAPES) <= 6
    assert (28, 256, 32, 35, "float32") in bench.FAMILY_QUICK_SHAPES
    assert {s[1] for s in bench.FAMILY_QUICK_SHAPES} == {256, 1024}
    columns = _family_table_columns(bench.family_table([]))
    for d in ("fwd", "bwd"):
        for family in ("step", "persistent", "cuDNN"):
            assert f"{d}: {family}" in columns, (d, family, columns)
    assert "auto picks (fwd / bwd)" in columns and "ran (persistent column)" in columns


def test_gpu_bench_family_table_and_fallback_check():
    """A row as family_row makes it: measured figures with the model's beside them; a
    persistent launch that fell back to the step kernels is named and fails the run."""
    bench = _load("gpu_bench")
    plans = {d: {"family": "cluster"} for d in ("forward", "backward")}
    assert bench.mismatches(plans, ["backward cluster", "forward cluster"]) == []
    assert bench.mismatches(plans, ["backward cluster", "forward step"]) == [
        "forward: planned cluster, ran step"]
    steps = {d: {"family": "step"} for d in ("forward", "backward")}
    assert bench.mismatches(steps, ["backward step", "forward step"]) == []
    assert len(bench.mismatches(steps, ["forward cluster"])) == 2
    row = {"I": 28, "H": 256, "B": 32, "T": 35, "dtype": "float32", "auto": "cluster / cluster",
           "ran": {"persistent": ["backward cluster", "forward step"]},
           "us": {"step": {"forward": 3.21, "backward": 4.0},
                  "persistent": {"forward": 2.5, "backward": 3.0}, "cudnn": None},
           "model": {"forward step": (2.0, 4.0), "forward persistent": (5.3, 6.5),
                     "backward step": (2.0, 4.0), "backward persistent": None},
           "fell_back": ["persistent column: forward: planned cluster, ran step"]}
    text = bench.family_table([row])
    line = next(l for l in text.splitlines() if l.startswith("| 28, 256, 32, 35, float32"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:] == ["cluster / cluster", "backward cluster, forward step", "3.2 (2.0-4.0)",
                         "2.5 (5.3-6.5)", "-", "4.0 (2.0-4.0)", "3.0 (-)", "-"]
    assert "NOT AS PLANNED" in text and "forward: planned cluster, ran step" in text


def test_gpu_bench_strict_fp32_and_family_are_restored(monkeypatch):
    """cuDNN is timed in strict float32 (TF32 off for its RNNs and cuBLAS), the family is
    forced through GRU_FUSED_CUDA_KERNEL; both as they were afterwards."""
    bench = _load("gpu_bench")
    before = bench.fp32_precision()
    with bench.strict_fp32() as got:
        assert got == {"cudnn_rnn": "ieee", "cuda_matmul": "ieee"}
        import torch
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert bench.fp32_precision() == before
    monkeypatch.setenv("GRU_FUSED_CUDA_KERNEL", "cooperative")
    with bench.kernel_family("step"):
        assert os.environ["GRU_FUSED_CUDA_KERNEL"] == "step"
    assert os.environ["GRU_FUSED_CUDA_KERNEL"] == "cooperative"
    monkeypatch.delenv("GRU_FUSED_CUDA_KERNEL")
    with bench.kernel_family("persistent"):
        assert os.environ["GRU_FUSED_CUDA_KERNEL"] == "persistent"
    assert "GRU_FUSED_CUDA_KERNEL" not in os.environ


def test_gpu_bench_dry_run_plans_every_row():
    """--dry-run (no GPU): every quick row, auto's pick from the planner for an H200, the
    model's estimates for both families, nothing measured."""
    if not gru_fused.cuda_compiled():
        pytest.skip("gru_fused was built without its CUDA kernels (no tiles to model)")
    bench = _load("gpu_bench")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--dry-run",
                          "--quick"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [l for l in run.stdout.splitlines() if re.match(r"\| \d+, \d+", l)]
    assert len(rows) == len(bench.FAMILY_QUICK_SHAPES)
    columns = _family_table_columns(run.stdout)
    import torch
    for (I, H, B, T, dtype), line in zip(bench.FAMILY_QUICK_SHAPES, rows):
        cells = dict(zip(columns, [c.strip() for c in line.strip("|").split("|")]))
        assert cells["I, H, B, T, dtype"] == f"{I}, {H}, {B}, {T}, {dtype}"
        plans = gru_fused.cuda_kernel_plan(H, B, getattr(torch, dtype), kernel="auto",
                                           device_properties=_load("perf_model").H200_PROPERTIES)
        assert cells["auto picks (fwd / bwd)"] == \
            f"{plans['forward']['family']} / {plans['backward']['family']}"
        for d in ("fwd", "bwd"):
            for family in ("step", "persistent"):
                assert re.fullmatch(r"- \(\d+\.\d-\d+\.\d\)", cells[f"{d}: {family}"]), cells


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
