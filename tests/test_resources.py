"""The compiled CUDA kernels' resources, read from the built extension with cuobjdump
(benchmarks/kernel_resources.py): no kernel may use stack or local memory (a spill, or
an accumulator array the compiler could not keep in registers, would put a memory round
trip into the inner loop), and each stays within its launch bounds' registers."""
import importlib.util
import os
from pathlib import Path

import pytest

import gru_fused

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("kernel_resources",
                                              ROOT / "benchmarks" / "kernel_resources.py")
kr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kr)

# 4 dtypes x (forward: fused; reset_update, candidate) + (backward: gates, final;
# gates, reset_gate, final) per architecture.
KERNELS_PER_ARCH = 4 * (3 + 5)


@pytest.fixture(scope="module")
def kernels():
    if not gru_fused.cuda_compiled():
        pytest.skip("gru_fused was built without its CUDA kernels")
    tool = kr.find_cuobjdump()
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("no cuobjdump (torch's triton package ships one; or pip install "
                        "nvidia-cuda-cuobjdump)")
        pytest.skip("no cuobjdump")
    return kr.gru_kernels(kr.parse_resource_usage(kr.dump(kr.extension_path(), tool)))


def test_every_kernel_is_found(kernels):
    archs = {k["arch"] for k in kernels}
    assert "sm_90" in archs, archs
    for arch in archs:
        mine = [k for k in kernels if k["arch"] == arch]
        assert len(mine) == KERNELS_PER_ARCH, (arch, [k["name"] for k in mine])
        assert all("phase" in k for k in mine), [k["name"] for k in mine if "phase" not in k]


def test_no_stack_no_local_memory(kernels):
    assert kr.problems(kernels) == []


def test_registers_within_launch_bounds(kernels):
    # __launch_bounds__(256, 2): two blocks per SM, so at most 65536 / 512 = 128.
    over = [(k["arch"], k["name"], k["REG"]) for k in kernels if k["REG"] > 128]
    assert not over, over


def test_problems_reports_stack_and_local_memory():
    """The check itself: a kernel with local memory, or stack, in a dump is reported."""
    dump = """
Fatbin elf code:
================
arch = sm_90
Resource usage:
 Function _ZN9gru_fused4cuda19forward_step_kernelIffLb1ELNS0_12ForwardPhaseE0EEEvNS0_13ForwardParamsIT_EEi:
  REG:100 STACK:0 SHARED:0 LOCAL:16 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN9gru_fused4cuda20backward_step_kernelIffLb1ELNS0_13BackwardPhaseE0EEEvNS0_14BackwardParamsIT_T0_EEi:
  REG:68 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:452 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN9gru_fused4cuda20backward_step_kernelIffLb1ELNS0_13BackwardPhaseE2EEEvNS0_14BackwardParamsIT_T0_EEi:
  REG:68 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:452 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    found = kr.gru_kernels(kr.parse_resource_usage(dump))
    assert [k["REG"] for k in found] == [100, 68, 68]
    bad = kr.problems(found)
    assert len(bad) == 2
    assert "LOCAL 16" in bad[0] and "STACK 8" in bad[1]
    if "forward_step_kernel<float" in found[0]["name"]:  # demangled (c++filt present)
        assert (found[0]["phase"], found[2]["phase"]) == ("fused", "final")


def test_occupancy_model():
    """sm_90 occupancy arithmetic on known cases: 64 registers x 256 threads fit 4 blocks
    (64K registers); 128 fit 2; 48 KB of shared memory fits 4 (228 KB, 1 KB reserved)."""
    assert kr.occupancy_sm90(64, 256, 0)["blocks"] == 4
    assert kr.occupancy_sm90(128, 256, 0)["blocks"] == 2
    assert kr.occupancy_sm90(32, 256, 48 * 1024) == dict(blocks=4, occupancy=0.5,
                                                         limit="shared memory")
    assert kr.occupancy_sm90(16, 256, 0) == dict(blocks=8, occupancy=1.0, limit="threads")


def test_performance_model_rows_name_real_kernels(kernels):
    """benchmarks/perf_model.py's rows and gpu_bench.py --per-kernel's measurements meet
    by kernel label: every modelled kernel must be one the extension contains."""
    import gru_fused._C as C

    spec = importlib.util.spec_from_file_location("perf_model", ROOT / "benchmarks" / "perf_model.py")
    pm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pm)
    labels = {k["label"] for k in kernels if "label" in k}
    modelled = {r["name"] for r in pm.kernels(C.CUDA_TILES)}
    assert modelled <= labels, modelled - labels
    for row in pm.rows_for(C.CUDA_TILES):  # every estimate is a positive range
        for shape in pm.SHAPES:
            lo, hi = row[shape]["gpu_us"]
            assert 0 < lo <= hi, (row["name"], shape, lo, hi)


def test_describe_kernel_reads_profiler_names():
    name = ("void gru_fused::cuda::backward_step_kernel<c10::BFloat16, float, false, "
            "(gru_fused::cuda::BackwardPhase)1>(gru_fused::cuda::BackwardParams<c10::BFloat16, "
            "float>, int)")
    d = kr.describe_kernel(name)
    assert d["label"] == "backward reset_gate (reset_before)" and d["dtype"] == "BFloat16"
    assert kr.describe_kernel("void at::native::vectorized_elementwise_kernel<4>()") is None
