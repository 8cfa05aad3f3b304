"""The compiled CUDA kernels' resources, read from the built extension with cuobjdump
(benchmarks/kernel_resources.py): no kernel may use stack or local memory (a spill, or
an accumulator array the compiler could not keep in registers, would put a memory round
trip into the inner loop), and each stays within its launch bounds' registers: 128 for
the step kernels (__launch_bounds__(256, 2)), 255 for the persistent ones (256, 1).
Also the performance model's (benchmarks/perf_model.py) checks: its kernels are the
extension's, its persistent plans the planner's, its numbers those PERF_MODEL.md shows."""
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

# Step kernels: 4 dtypes x (forward: fused; reset_update, candidate) + (backward: gates,
# final; gates, reset_gate, final). Persistent kernels: 3 dtypes (no float64) x forward,
# backward x reset_after, reset_before x cluster, cooperative. Per architecture (the
# cluster kernels are compiled for sm_80 too, as __trap stubs the planner never launches).
STEP_KERNELS_PER_ARCH = 4 * (3 + 5)
PERSISTENT_KERNELS_PER_ARCH = 3 * 2 * 2 * 2
KERNELS_PER_ARCH = STEP_KERNELS_PER_ARCH + PERSISTENT_KERNELS_PER_ARCH


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
        persistent = [k for k in mine if k["phase"] == "persistent"]
        assert len(persistent) == PERSISTENT_KERNELS_PER_ARCH, (arch, len(persistent))
        # Every (direction, dtype, formula, family) once; no float64 persistent kernel.
        keys = {(k["kind"], k["dtype"], k["reset_after"], k["family"]) for k in persistent}
        assert keys == {(d, t, ra, f) for d in ("forward", "backward")
                        for t in ("float", "Half", "BFloat16") for ra in (True, False)
                        for f in ("cluster", "cooperative")}, sorted(keys)


def test_persistent_kernels_have_no_non_coherent_loads(kernels):
    """The persistent kernels read, during their launch, global memory other CTAs write in
    it (the cooperative family's h and gate gradients, after the grid barrier). A load
    through the read-only cache (SASS `LDG.E...CONSTANT`, PTX `ld.global.nc`, which nvcc
    may emit for `const __restrict__` data) is not coherent with those writes and could
    read a stale value on a GPU; the emulator cannot see it. None may have one."""
    import re
    import subprocess

    sass = subprocess.run([kr.find_cuobjdump(), "-sass", kr.extension_path()],
                          capture_output=True, text=True, check=True).stdout
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    persistent = [f for f in functions if "persistent_kernel" in f.split("\n", 1)[0]]
    assert len(persistent) == len([k for k in kernels if k["phase"] == "persistent"])
    for f in persistent:
        assert re.search(r"\bLDG\.", f), "no global load found: is this the SASS?"
        nc = re.findall(r"LDG[.\w]*CONSTANT[^\n]*", f)
        assert not nc, (f.split("\n", 1)[0], nc[:3])


def test_no_stack_no_local_memory(kernels):
    assert kr.problems(kernels) == []


def test_registers_within_launch_bounds(kernels):
    # Step kernels: __launch_bounds__(256, 2), two blocks per SM: at most 65536 / 512 = 128.
    # Persistent kernels: __launch_bounds__(256, 1): the architecture's 255.
    assert kr.register_problems(kernels) == []
    assert {k["family"] for k in kernels} == {"step", "cluster", "cooperative"}
    assert max(k["REG"] for k in kernels if k["family"] == "step") <= 128


def test_resource_table_has_a_row_per_kernel(kernels):
    """kernel_resources.py's table (the README's): one row per sm_90 kernel, each persistent
    row with the planner's shared memory at the book's shape on an H200."""
    import gru_fused._C as C

    text = kr.table(kernels, C.CUDA_TILES, "sm_90")
    rows = [line for line in text.splitlines()[2:] if line.startswith("| ")]
    assert len(rows) == KERNELS_PER_ARCH
    persistent = [r for r in rows if " persistent " in r]
    assert len(persistent) == PERSISTENT_KERNELS_PER_ARCH
    plan = gru_fused.cuda_kernel_plan(256, 32, device_properties=kr.H200_PROPERTIES,
                                      kernel="cluster")["forward"]
    assert any(r.startswith("| forward persistent cluster | reset_after | float |")
               and f"| {plan['smem'] / 1024:.1f} KB |" in r for r in persistent), persistent


def test_problems_reports_stack_and_local_memory():
    """The check itself: a kernel with local memory, or stack, in a dump is reported; so is
    a step kernel over 128 registers or a persistent one over 255."""
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
  REG:130 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:452 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN9gru_fused4cuda25forward_persistent_kernelIffLb1ELb1EEEvNS0_13ForwardParamsIT_EENS0_15PersistentShapeENS0_16PersistentLayoutE:
  REG:200 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:688 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN9gru_fused4cuda26backward_persistent_kernelIN3c108BFloat16EfLb0ELb0EEEvNS0_14BackwardParamsIT_T0_EENS0_15PersistentShapeENS0_16PersistentLayoutE:
  REG:256 STACK:0 SHARED:1024 LOCAL:4 CONSTANT[0]:672 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    found = kr.gru_kernels(kr.parse_resource_usage(dump))
    assert [k["REG"] for k in found] == [100, 68, 130, 200, 256]
    bad = kr.problems(found)
    assert len(bad) == 3
    assert "LOCAL 16" in bad[0] and "STACK 8" in bad[1] and "LOCAL 4" in bad[2]
    if "forward_step_kernel<float" in found[0]["name"]:  # demangled (c++filt present)
        assert [k["phase"] for k in found] == ["fused", "gates", "final", "persistent",
                                               "persistent"]
        assert [k["family"] for k in found[3:]] == ["cluster", "cooperative"]
        assert found[4]["dtype"] == "BFloat16" and not found[4]["reset_after"]
        # 130 registers are too many for a step kernel, 200 are not for a persistent one.
        over = kr.register_problems(found)
        assert len(over) == 2 and "130 registers" in over[0] and "256 registers" in over[1]


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
    assert d["family"] == "step"
    name = ("void gru_fused::cuda::forward_persistent_kernel<c10::Half, float, true, false>("
            "gru_fused::cuda::ForwardParams<c10::Half>, gru_fused::cuda::PersistentShape, "
            "gru_fused::cuda::PersistentLayout)")
    d = kr.describe_kernel(name)
    assert d["label"] == "forward persistent cooperative (reset_after)"
    assert (d["dtype"], d["family"], d["phase"]) == ("Half", "cooperative", "persistent")
    assert kr.describe_kernel("void at::native::vectorized_elementwise_kernel<4>()") is None


# --- the performance model of the persistent kernels (benchmarks/perf_model.py) ---------

def _perf_model():
    if not gru_fused.cuda_compiled():
        pytest.skip("gru_fused was built without its CUDA kernels (no tiles to model)")
    spec = importlib.util.spec_from_file_location("perf_model", ROOT / "benchmarks" / "perf_model.py")
    pm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pm)
    import gru_fused._C as C
    return pm, C.CUDA_TILES


def test_persistent_model_plans_are_the_planners(monkeypatch):
    """Every persistent row's geometry is gru_fused.cuda_kernel_plan's for an H200 (the same
    H200 as kernel_resources.py's), asked at run time: a different planner answer changes
    the estimate."""
    import torch

    pm, tiles = _perf_model()
    assert pm.H200_PROPERTIES == kr.H200_PROPERTIES
    rows = pm.persistent_rows(tiles)
    assert {(r["H"], r["B"]) for r in rows} == set(pm.PERSISTENT_SHAPES)
    for r in rows:
        want = gru_fused.cuda_kernel_plan(r["H"], r["B"], getattr(torch, r["dtype"]), True,
                                          kernel="persistent", device_properties=pm.H200_PROPERTIES)
        assert r["plans"] == want, (r["H"], r["B"], r["dtype"])
        for d in ("forward", "backward"):
            assert r[d]["plan"] == want[d]
            assert want[d]["family"] in ("cluster", "cooperative"), want[d]  # no fallback
    book = pm.persistent_model(tiles, pm.h200_plan(*pm.BOOK)["forward"], "forward", *pm.BOOK)

    real = gru_fused.cuda_kernel_plan

    def half_the_units(*args, **kwargs):  # per CTA: half the tiles, half the exchange
        return {d: dict(p, units=p["units"] // 2) for d, p in real(*args, **kwargs).items()}

    monkeypatch.setattr(gru_fused, "cuda_kernel_plan", half_the_units)
    halved = pm.persistent_model(tiles, pm.h200_plan(*pm.BOOK)["forward"], "forward", *pm.BOOK)
    assert halved["parts"][0][0]["tiles"] == book["parts"][0][0]["tiles"] // 2
    assert halved["per_step_us"][1] < book["per_step_us"][1]


def test_persistent_model_at_the_books_shape():
    """The estimates are ranges; the book's shape under cuDNN's anchors (7-9 µs forward,
    8-12 backward, GPU_NOTES.md), one-time costs amortised (more per step at T=35 than at
    T=256), each what-if no slower than the row before it, the cooperative plans at
    H=1024 paying a grid barrier per phase."""
    pm, tiles = _perf_model()
    H, B = pm.BOOK
    plans = pm.h200_plan(H, B)
    cudnn_low = {"forward": 7.0, "backward": 8.0}
    for d in ("forward", "backward"):
        m = pm.persistent_model(tiles, plans[d], d, H, B)
        lo, hi = m["per_step_us"]
        assert 0 < lo <= hi < cudnn_low[d], (d, lo, hi)
        assert m["amortised_us"][35][0] > m["amortised_us"][256][0] > lo
        assert float(pm.cudnn_anchor(H, B, d).split("-")[0]) == cudnn_low[d]
    previous = None
    for row in pm.what_if_rows(tiles):
        now = [row[d]["amortised_us"][35][1] for d in ("forward", "backward")]
        if previous is not None:
            assert all(n <= p for n, p in zip(now, previous)), (row["change"], now, previous)
        previous = now
    for reset_after, phases in ((True, 1), (False, 2)):
        plan = pm.h200_plan(1024, 32, reset_after=reset_after)["forward"]
        assert plan["family"] == "cooperative"
        m = pm.persistent_model(tiles, plan, "forward", 1024, 32, reset_after)
        assert len(m["parts"][0]) == phases
        assert m["per_step_us"][0] >= phases * pm.GRID_BARRIER_US[0]


def test_perf_model_md_shows_the_models_numbers():
    """benchmarks/PERF_MODEL.md holds `python benchmarks/perf_model.py`'s tables verbatim:
    a change to the tiles, the planner or the model's constants must regenerate it
    (`python benchmarks/perf_model.py --update-doc`)."""
    pm, tiles = _perf_model()
    doc = (ROOT / "benchmarks" / "PERF_MODEL.md").read_text()
    assert pm.table(tiles) in doc
    assert pm.persistent_table(tiles) in doc
