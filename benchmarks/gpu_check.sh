#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU, run from the repo root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. builds the extension for the visible GPU, 2. runs the CUDA tests, 3. runs
# compute-sanitizer (memcheck, racecheck) on a small forward + backward, 4. runs the GPU
# benchmark and prints its table last. Needs no internet (torch, ninja and pytest must be
# installed already). Full logs and results.json go to OUT_DIR (default: gpu_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
status=0
step() { echo; echo "=== $* ==="; }

step "build"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if ! "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "build failed"; exit 1
fi
grep "gru_fused: building" "$out/build.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import gru_fused, torch; assert gru_fused.cuda_compiled(); print(torch.cuda.get_device_name())" || exit 1

step "CUDA tests"
timeout 300 "$py" -m pytest -q -k cuda -p no:cacheprovider tests/test_ops.py tests/test_module.py \
  tests/test_scratch.py 2>&1 | tee "$out/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)"
for tool in memcheck racecheck; do
  step "compute-sanitizer --tool $tool"
  if [ -z "$sanitizer" ]; then echo "compute-sanitizer not found"; status=1; continue; fi
  timeout 300 "$sanitizer" --tool "$tool" --error-exitcode 9 "$py" benchmarks/gpu_small.py \
    > "$out/sanitizer_$tool.log" 2>&1
  rc=$?
  tail -4 "$out/sanitizer_$tool.log"
  [ "$rc" -eq 0 ] || { echo "compute-sanitizer $tool: exit $rc"; status=1; }
done

step "benchmark"
timeout 300 "$py" benchmarks/gpu_bench.py --json "$out/results.json" 2>&1 | tee "$out/bench.log" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo
echo "gpu_check: $([ $status -eq 0 ] && echo OK || echo FAILED) (logs in $out)"
exit $status
