#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU; needs no internet (torch, ninja, pytest and
# the CUDA toolkit with compute-sanitizer installed already):
#
#   bash benchmarks/gpu_check.sh [--quick] [OUT_DIR]
#
# Phases, in this order so that the numbers come back first; each prints "[phase] N s":
#   build      the extension for the visible GPU (setup.py build_ext --inplace), imported
#   bench      the GPU benchmark tables (gpu_bench.py: nn.GRU vs FusedGRU, then the kernel
#              families: step, persistent and cuDNN in µs per step beside the performance
#              model's estimates; --quick: a few shapes, short timings)
#   train      the time machine training line (bench.py --part train; needs the book's
#              text: $GRU_FUSED_DATA, else data/timemachine.txt, git-ignored); not --quick
#   tests-FAMILY, for each kernel family (step, cluster, cooperative: GRU_FUSED_CUDA_KERNEL,
#              which the extension reads at every call, forces it): first a check that the
#              forced family's kernels are the ones that run (gpu_bench.py --check-family: a
#              persistent launch the device refused would fall back to the step kernels
#              unseen), then the CUDA tests (tests/test_cuda.py and every *_cuda test;
#              --quick: the first) with that family
#   memcheck-FAMILY   compute-sanitizer on benchmarks/gpu_small.py with that family, every
#              kernel, with PyTorch's caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1):
#              inside a cached segment an out-of-bounds access would go unseen
#   racecheck-FAMILY, synccheck-FAMILY, initcheck-FAMILY (not --quick): gru_fused's kernels
#              only (--kernel-name kns=gru_fused: every kernel's mangled name holds it);
#              initcheck with the caching allocator off too, so fresh memory is uninitialised
# A failing phase does not stop the next. The run keeps within a time budget
# ($GPU_CHECK_BUDGET_S, default 1200 s, 450 s with --quick: a quick run fits an 8 minute
# slot): each phase gets at most what is left, and one that cannot run in it is skipped
# and counts as failed. Exit status 0 only if every phase passed.
# Full logs, the benchmark's results.json and the tests' JUnit XML (tests-FAMILY.xml) go
# to OUT_DIR (default gpu_check_out, git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
out=gpu_check_out
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ "$quick" -eq 1 ]; then budget="${GPU_CHECK_BUDGET_S:-450}"; else budget="${GPU_CHECK_BUDGET_S:-1200}"; fi
# The kernel families the tests and the sanitizers run, each forced in turn: the step
# kernels (auto's pick for now) and both persistent families (on an H200, `persistent`
# would pick the cluster kernels at every shape the tests use, so the cooperative ones
# are forced here to run at all).
families=(step cluster cooperative)

# The book's text for the training line (and any test that reads it).
data="${GRU_FUSED_DATA:-}"
if [ -z "$data" ] && [ -f data/timemachine.txt ]; then data="$PWD/data/timemachine.txt"; fi
if [ -n "$data" ]; then export GRU_FUSED_DATA="$data"; fi

sanitizer="$(command -v compute-sanitizer || true)"
if [ -z "$sanitizer" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]; then
  sanitizer="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
fi

# The phases' commands (run by run_phase in a child bash, hence exported).
build() {
  "$py" setup.py build_ext --inplace
  "$py" -c "import torch, gru_fused
assert gru_fused.cuda_compiled(), 'built without the CUDA kernels'
print('gru_fused', gru_fused.__version__, gru_fused.__commit__, '| torch', torch.__version__,
      '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())"
}

tests() {  # tests FAMILY: the forced family runs, then the CUDA tests with it
  local family="$1" files=(tests/test_cuda.py)
  if [ "$quick" -eq 0 ]; then
    # The CUDA graph tests last (test_cuda.py, then test_train_step.py, whose last test
    # makes a capture fail on purpose): should a capture fail, it could upset the device,
    # or PyTorch's allocator, for the tests after it.
    files=(tests/test_ops.py tests/test_module.py tests/test_func.py tests/test_scratch.py
           tests/test_cuda.py tests/test_train_step.py)
  fi
  GRU_FUSED_CUDA_KERNEL="$family" "$py" benchmarks/gpu_bench.py --check-family
  # CI=1: a test that needs the book's text fails without it instead of skipping.
  GRU_FUSED_CUDA_KERNEL="$family" CI=1 "$py" -m pytest -q -rs -p no:cacheprovider \
    --junitxml "$out/tests-$family.xml" -k cuda "${files[@]}"
}

sanitize() {  # sanitize FAMILY on|off TOOL [OPTION...]: compute-sanitizer on gpu_small.py
              # with that kernel family forced and PyTorch's caching allocator on or off
              # (off: any value of the variable)
  local family="$1" caching=(env -u PYTORCH_NO_CUDA_MEMORY_CACHING)
  if [ "$2" = off ]; then caching=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1); fi
  shift 2
  if [ -z "$sanitizer" ]; then echo "compute-sanitizer not found"; return 1; fi
  "${caching[@]}" GRU_FUSED_CUDA_KERNEL="$family" "$sanitizer" --tool "$@" --error-exitcode 1 \
    "$py" benchmarks/gpu_small.py
}
export -f build tests sanitize
export py quick out sanitizer

failed=()
summary=()
# run_phase NAME CAP_SECONDS COMMAND...: COMMAND (output to OUT/NAME.log, the interesting
# part of it to stdout) for at most min(CAP, what is left of the budget).
run_phase() {
  local name="$1" cap="$2"
  shift 2
  local left=$((budget - SECONDS)) limit rc start log="$out/$name.log"
  limit=$((cap < left ? cap : left))
  echo
  echo "=== $name (at most ${limit} s) ==="
  if [ "$limit" -lt 15 ]; then
    echo "[$name] skipped: ${left} s of the ${budget} s budget left"
    failed+=("$name"); summary+=("$name: skipped, out of time"); return 0
  fi
  start=$SECONDS
  if timeout --kill-after=10 "$limit" bash -c 'set -euo pipefail; "$@"' _ "$@" > "$log" 2>&1
  then rc=0; else rc=$?; fi
  if [ "$name" = bench ] && grep -q '^Benchmark, float32' "$log"; then
    grep -m1 '^environment:' "$log"
    sed -n '/^Benchmark, float32/,$p' "$log"
  elif [[ "$name" == tests* ]] || [ "$name" = train ] || [ "$name" = bench ]; then
    tail -40 "$log"
  else
    tail -6 "$log"
  fi
  local took=$((SECONDS - start)) verdict=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="timed out"
  elif [ "$rc" -ne 0 ]; then verdict="failed (exit $rc)"; fi
  echo "[$name] $took s: $verdict"
  summary+=("$name: $took s, $verdict")
  if [ "$verdict" != ok ]; then failed+=("$name"); fi
  return 0
}

echo "gpu_check: $([ "$quick" -eq 1 ] && echo quick || echo full) run, budget ${budget} s, logs in $out"
run_phase build 240 build
if [[ " ${failed[*]-} " == *" build "* ]]; then
  echo "gpu_check: FAILED: the build (see $out/build.log); nothing else can run"
  exit 1
fi
if [ "$quick" -eq 1 ]; then
  run_phase bench 90 "$py" benchmarks/gpu_bench.py --quick --per-kernel --json "$out/results.json"
else
  run_phase bench 240 "$py" benchmarks/gpu_bench.py --per-kernel --json "$out/results.json"
  if [ -n "$data" ]; then
    # The time machine training step in every mode (the book's loop, the sync-free step
    # eagerly, torch.compile, CUDA graphs): tokens/s and the ratio to the book's nn.GRU.
    run_phase train 90 "$py" benchmarks/bench.py --part train --device cuda --epochs 5 \
      --modes book eager compile cuda-graphs --no-progress --data "$data" --out "$out/train"
  else
    echo; echo "[train] skipped: no timemachine.txt (set GRU_FUSED_DATA or put it in data/)"
    summary+=("train: skipped (no data)")
  fi
fi
if [ "$quick" -eq 1 ]; then tests_cap=75 memcheck_cap=90; else tests_cap=200 memcheck_cap=120; fi
for f in "${families[@]}"; do
  run_phase "tests-$f" "$tests_cap" tests "$f"
done
for f in "${families[@]}"; do
  run_phase "memcheck-$f" "$memcheck_cap" sanitize "$f" off memcheck
done
if [ "$quick" -eq 0 ]; then
  for f in "${families[@]}"; do
    run_phase "racecheck-$f" 75 sanitize "$f" on racecheck --kernel-name kns=gru_fused
    run_phase "synccheck-$f" 75 sanitize "$f" on synccheck --kernel-name kns=gru_fused
    run_phase "initcheck-$f" 75 sanitize "$f" off initcheck --kernel-name kns=gru_fused
  done
fi

echo
echo "=== summary (${SECONDS} s of ${budget} s) ==="
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -eq 0 ]; then
  echo "gpu_check: OK (logs in $out)"
  exit 0
fi
echo "gpu_check: FAILED: ${failed[*]} (logs in $out)"
exit 1
