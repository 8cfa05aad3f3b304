"""The CUDA kernels, executed on the CPU through the project's CUDA emulation layer.

csrc/cuda/gru_kernels.cuh is compiled with g++ and -DGRU_EMULATE_CUDA (csrc/emu/cuda_emu.h),
so every kernel the GPU build contains runs here, on machines with no GPU:

- an emulation extension (tests/emu/emu_ops.cpp) registers the CUDA backend's step
  loops for CPU tensors as torch.ops.gru_fused_emu.*; in every dtype the kernels are
  instantiated for, forward and backward, both formulas, their results must match the
  CPU backend's, must not depend on the order of the blocks, and a whole FusedGRU
  forward + backward is routed through them;
- a torch-free program (tests/emu/sanitize_main.cpp) runs every kernel under
  AddressSanitizer and ThreadSanitizer, and deliberately broken variants must be
  caught: a missing barrier and a race between blocks (ThreadSanitizer), an
  off-by-one read (AddressSanitizer), a barrier that part of a block skips (the
  emulator's barrier check);
- a self-test (tests/emu/emu_selftest.cpp) proves each of the emulator's detectors on
  toy kernels, independently of the GRU kernels.

What the emulator models: blocks of a launch running concurrently (in seeded random
order, in waves), every CUDA thread a fiber with __syncthreads() its only ordering,
barrier divergence, shared memory sizes and limits. What it does not: warps, the GPU's
weak memory ordering, co-residency and occupancy, timing, device floating point (see
the top of csrc/emu/cuda_emu.h). A kernel that passes here can still fail on a GPU.
"""
import concurrent.futures
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import gru_fused

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = ROOT / "tests" / "emu"


@pytest.fixture(scope="module")
def emu_ops(tmp_path_factory):
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("gru_fused_emu")
    load(name="gru_fused_emu", sources=[str(CSRC / "gru_driver.cpp"), str(EMU / "emu_ops.cpp")],
         extra_include_paths=[str(CSRC)],
         extra_cflags=["-O1", "-DGRU_EMULATE_CUDA", "-Wall", "-Werror"],
         build_directory=str(build), is_python_module=False, verbose=False)
    yield torch.ops.gru_fused_emu
    torch.ops.gru_fused_emu.set_seed(-1)


def make(T, B, I, H, dtype, seed, lengths):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    x, hx = r(T, B, I), r(B, H)
    w_ih, w_hh = r(3 * H, I, scale=H ** -0.5), r(3 * H, H, scale=H ** -0.5)
    b_ih, b_hh = r(3 * H), r(3 * H)
    lens = torch.randint(0, T + 1, (B,), generator=g) if lengths else None
    return x, hx, w_ih, w_hh, b_ih, b_hh, lens


# The kernels' block tiles have 8 or 16 units and 4 or 8 batch rows, and reduce in
# chunks of 128 k (forward r, z, n) or 256 (one-gate kernels, the backward): H=37 several
# unit tiles, one partial; B=9, 5: partial row tiles; H=67, B=9 several blocks in both
# grid dimensions; H=300 several chunks, the last partial, in every kernel (K = H, 2H
# or 3H; 128 or 256 per chunk): the double-buffered loop.
SHAPES = [(3, 5, 4, 37), (2, 9, 3, 8), (1, 1, 2, 3), (4, 2, 6, 33), (3, 9, 5, 67),
          (2, 3, 4, 300)]

# Emulated kernels against the CPU backend, both in the same dtype. Both round the same
# inputs and compute in the same accumulate type (float for half and bfloat16), so they
# differ only by summation order, and by the roundings to the storage dtype that such a
# difference flips (a state or gate value one ulp apart, carried on through the steps).
# Measured worst case over the SHAPES matrix, relative to |expected| + 1: float64
# ~14 eps, float32 ~7 eps, float16 ~1.5 eps, bfloat16 ~1.7 eps. The tolerances allow
# 4.5x that or more, and the formula check below shows they still fail a wrong gate
# formula by a wide margin.
EPS = {dt: torch.finfo(dt).eps for dt in (torch.float64, torch.float32, torch.float16,
                                          torch.bfloat16)}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 8 * EPS[torch.float16],
       torch.bfloat16: 8 * EPS[torch.bfloat16]}
DTYPES = list(TOL)
DTYPE_IDS = ["float64", "float32", "float16", "bfloat16"]

FORWARD_NAMES = ["output", "h_n", "workspace"]
BACKWARD_NAMES = ["grad_input", "grad_hx", "grad_weight_ih", "grad_weight_hh", "grad_bias_ih",
                  "grad_bias_hh"]


def run_both(ops, x, hx, w_ih, w_hh, b_ih, b_hh, lens, reset_after, reverse, seed=0):
    """Forward, then backward with fixed random output gradients, through `ops`; the
    backward is fed the CPU backend's forward (the saved workspace the emulator reads is
    then identical). Returns the 3 forward and the 6 backward outputs."""
    fwd = (x, hx, w_ih, w_hh, b_ih, b_hh, lens, reset_after, reverse)
    ref = torch.ops.gru_fused.gru_forward(*fwd)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(ref[0].shape, generator=g, dtype=torch.float64).to(x.dtype)
    gh = torch.randn(ref[1].shape, generator=g, dtype=torch.float64).to(x.dtype)
    bwd = (go, gh, x, hx, w_ih, w_hh, ref[0], ref[2], lens, True, reset_after, reverse,
           [True] * 6)
    return list(ops.gru_forward(*fwd)) + list(ops.gru_backward(*bwd))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_emulated_kernels_match_cpu(emu_ops, shape, reset_after, reverse, lengths, dtype):
    """Forward outputs, the saved workspace and every backward output equal the CPU
    backend's, in every dtype the kernels are instantiated for (tolerances: TOL)."""
    args = make(*shape, dtype, seed=sum(shape), lengths=lengths)
    got = run_both(emu_ops, *args, reset_after, reverse)
    want = run_both(torch.ops.gru_fused, *args, reset_after, reverse)
    tol = TOL[dtype]
    for name, g, w in zip(FORWARD_NAMES + BACKWARD_NAMES, got, want):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shape", [(3, 9, 5, 67), (2, 3, 4, 300)], ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [False, True])
def test_emulated_inference_keeps_one_step(emu_ops, shape, reset_after, reverse, lengths):
    """gru_inference as the CUDA backend runs it: every step reuses one step's workspace
    slots (ws_steps = 1; reset_before's candidate reads r h from that one slot). Its
    output and h_n are the bits of gru_forward's, which keeps all T steps."""
    args = make(*shape, torch.float32, seed=sum(shape), lengths=lengths)
    fwd = emu_ops.gru_forward(*args, reset_after, reverse)
    got = emu_ops.gru_inference(*args, reset_after, reverse)
    assert fwd[2].shape[1] == shape[0]  # the forward kept T steps of slots
    for name, g, w in zip(["output", "h_n"], got, fwd[:2]):
        assert torch.equal(g, w), name


def gru_reference(x, hx, w_ih, w_hh, b_ih, b_hh, reset_after, mistake=None):
    """nn.GRU's formulas in plain float64 torch (autograd gives the backward), or the same
    with one deliberate mistake: the kind of bug a kernel could have."""
    H = hx.shape[1]
    h, outs = hx, []
    for x_t in x:
        gi = x_t @ w_ih.T + b_ih
        gh_rz = h @ w_hh[:2 * H].T + b_hh[:2 * H]
        r = torch.sigmoid(gi[:, :H] + gh_rz[:, :H])
        z = torch.sigmoid(gi[:, H:2 * H] + gh_rz[:, H:])
        if mistake == "r_and_z_swapped":
            r, z = z, r
        w_hn, b_hn = w_hh[2 * H:], b_hh[2 * H:]
        if reset_after:
            hn = h @ w_hn.T + (0 if mistake == "b_hn_dropped" else b_hn)
            n = torch.tanh(gi[:, 2 * H:] + r * hn)
        else:
            n = torch.tanh(gi[:, 2 * H:] + (r * h) @ w_hn.T + b_hn)
        h = (z * n + (1 - z) * h) if mistake == "update_inverted" else (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs), h


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("reset_after", [True, False])
def test_low_precision_tolerances_catch_wrong_formulas(dtype, reset_after):
    """TOL is tight enough to fail a wrong gate formula: the CPU backend's forward output
    and grad_weight_hh in the dtype, against the float64 formulas with a deliberate
    mistake (rounded to the dtype), must fail assert_close at TOL[dtype], and pass it
    against the right formula. Measured: the right formula within 0.4 TOL (the inputs,
    and h at every step, are rounded to the dtype), the wrong ones 11 TOL away or more."""
    x, hx, w_ih, w_hh, b_ih, b_hh, _ = make(3, 5, 4, 37, dtype, seed=7, lengths=False)
    fwd = torch.ops.gru_fused.gru_forward(x, hx, w_ih, w_hh, b_ih, b_hh, None, reset_after,
                                          False)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(fwd[0].shape, generator=g, dtype=torch.float64).to(dtype)
    gh = torch.randn(fwd[1].shape, generator=g, dtype=torch.float64).to(dtype)
    grads = torch.ops.gru_fused.gru_backward(go, gh, x, hx, w_ih, w_hh, fwd[0], fwd[2], None,
                                             True, reset_after, False, [True] * 6)
    got = {"output": fwd[0], "grad_weight_hh": grads[3]}

    def reference(mistake):
        w = w_hh.double().requires_grad_()
        out, h_n = gru_reference(x.double(), hx.double(), w_ih.double(), w, b_ih.double(),
                                 b_hh.double(), reset_after, mistake)
        ((out * go.double()).sum() + (h_n * gh.double()).sum()).backward()
        return {"output": out.detach().to(dtype), "grad_weight_hh": w.grad.to(dtype)}

    tol = TOL[dtype]
    right = reference(None)
    for name in got:
        torch.testing.assert_close(got[name], right[name], rtol=tol, atol=tol,
                                   msg=lambda m: f"{name} vs the right formula: {m}")
    mistakes = ["r_and_z_swapped", "update_inverted"] + (["b_hn_dropped"] if reset_after else [])
    for mistake in mistakes:
        wrong = reference(mistake)
        for name in got:
            with pytest.raises(AssertionError):
                torch.testing.assert_close(got[name], wrong[name], rtol=tol, atol=tol)
    # The other formula is a wrong formula too.
    other = torch.ops.gru_fused.gru_forward(x, hx, w_ih, w_hh, b_ih, b_hh, None,
                                            not reset_after, False)[0]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got["output"], other, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reset_after", [True, False])
def test_results_do_not_depend_on_block_order(emu_ops, dtype, reset_after):
    """Three seeds of the emulator's block and thread order give bitwise-equal forward and
    backward results: every output element has one writer that sums in a fixed order.
    H=67, B=9: every kernel's grid has several blocks in both dimensions."""
    assert_same_bits_in_any_order(emu_ops, make(3, 9, 5, 67, dtype, seed=11, lengths=True),
                                  reset_after)


def assert_same_bits_in_any_order(emu_ops, args, reset_after, label=""):
    """run_both (reverse) under three seeds of the emulator's block and thread order."""
    results = []
    try:
        for seed in (1, 2, 12345):
            emu_ops.set_seed(seed)
            results.append(run_both(emu_ops, *args, reset_after, reverse=True))
    finally:
        emu_ops.set_seed(-1)
    for other in results[1:]:
        for name, a, b in zip(FORWARD_NAMES + BACKWARD_NAMES, results[0], other):
            assert torch.equal(a, b), (label, name)


@pytest.fixture
def cpu_ops_routed_through_emulation(emu_ops):
    """Registers the emulated kernels as gru_fused's CPU kernels for one test."""
    calls = {"forward": 0, "backward": 0}

    def forward(*args):
        calls["forward"] += 1
        return emu_ops.gru_forward(*args)

    def backward(*args):
        calls["backward"] += 1
        return emu_ops.gru_backward(*args)

    lib = torch.library.Library("gru_fused", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("gru_forward", forward, "CPU")
        lib.impl("gru_backward", backward, "CPU")
    try:
        yield calls
    finally:
        lib._destroy()


def packed_fused_gru_against_nn_gru(dtype):
    """A 2-layer bidirectional FusedGRU in `dtype` and nn.GRU in float64 with its weights,
    forward + backward on packed sequences of unequal lengths: ([output, h_n, grads...]
    of FusedGRU, the same of nn.GRU)."""
    torch.manual_seed(0)
    ref = torch.nn.GRU(5, 12, num_layers=2, bidirectional=True, dtype=torch.float64)
    model = gru_fused.FusedGRU(5, 12, num_layers=2, bidirectional=True, dtype=dtype)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 1])
    results = []
    for m, dt in ((model, dtype), (ref, torch.float64)):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x.to(dt), lengths)
        out, h_n = m(packed)
        padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out)
        (padded.square().sum() + h_n.sum()).backward()
        results.append([padded, h_n] + [p.grad for p in m.parameters()])
    return results


def test_fused_gru_through_emulated_kernels(cpu_ops_routed_through_emulation):
    """A 2-layer bidirectional FusedGRU, forward + backward, with packed sequences of
    unequal lengths: the emulated CUDA kernels against nn.GRU."""
    calls = cpu_ops_routed_through_emulation
    got, want = packed_fused_gru_against_nn_gru(torch.float64)
    assert calls["forward"] == 4 and calls["backward"] == 4  # 2 layers x 2 directions
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_emulated_routing_is_undone(emu_ops):
    """After the routing fixture, gru_fused's CPU kernels are the native ones again."""
    x, hx, w_ih, w_hh, b_ih, b_hh, _ = make(2, 2, 3, 4, torch.float32, seed=0, lengths=False)
    with torch.autograd.profiler.profile() as prof:
        torch.ops.gru_fused.gru_forward(x, hx, w_ih, w_hh, b_ih, b_hh, None, True, False)
    assert not any("gru_fused_emu" in e.name for e in prof.function_events)


# --- persistent kernels --------------------------------------------------------------
# The cluster and cooperative kernels (csrc/cuda/gru_persistent.cuh) run the step
# kernels' tiles in the same order, so they must give the step kernels' bits (and those
# match the CPU backend: test_emulated_kernels_match_cpu). The emulated device is an sm_90
# of GRU_EMU_SM_COUNT SMs (16 by default); GRU_FUSED_CUDA_KERNEL forces the family.

FAMILIES = ["cluster", "cooperative"]
PERSISTENT_KERNELS = ["forward_cluster", "backward_cluster", "forward_cooperative",
                      "backward_cooperative"]
STEP_KERNELS = ["forward_step", "backward_step", "backward_reset", "backward_final"]
# SHAPES, and two at more SMs: B=33 on 64 SMs is 5 clusters of 7 rows (the last 5), H=50
# 8 CTAs of 7 units (the last 1); B=17, H=130 on 40 SMs: 3 clusters, cooperative grids of
# 17 CTAs.
PERSISTENT_SHAPES = [(s, 16) for s in SHAPES] + [((3, 33, 4, 50), 64), ((2, 17, 3, 130), 40)]


def launches(emu_ops):
    return {k: emu_ops.launch_count(k) for k in PERSISTENT_KERNELS + STEP_KERNELS}


def run_family(emu_ops, monkeypatch, family, args, reset_after, reverse, sm_count=16):
    """run_both on the kernels of `family`; returns the results and the launches."""
    monkeypatch.setenv("GRU_FUSED_CUDA_KERNEL", family)
    monkeypatch.setenv("GRU_EMU_SM_COUNT", str(sm_count))
    emu_ops.reset_launch_counts()
    got = run_both(emu_ops, *args, reset_after, reverse)
    return got, launches(emu_ops)


@pytest.mark.parametrize("shape,sm_count", PERSISTENT_SHAPES,
                         ids=lambda s: "T%dB%dI%dH%d" % s if isinstance(s, tuple) else f"sm{s}")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("reverse,lengths", [(False, False), (True, True)])
def test_persistent_kernels_give_step_kernels_bits(emu_ops, monkeypatch, shape, sm_count, family,
                                                   reset_after, reverse, lengths):
    """float32: forward outputs, workspace and every backward output bit for bit the step
    kernels', and the persistent kernels (one launch each way) are what ran."""
    args = make(*shape, torch.float32, seed=sum(shape), lengths=lengths)
    want, _ = run_family(emu_ops, monkeypatch, "step", args, reset_after, reverse, sm_count)
    got, ran = run_family(emu_ops, monkeypatch, family, args, reset_after, reverse, sm_count)
    assert ran[f"forward_{family}"] == 1 and ran[f"backward_{family}"] == 1, ran
    assert all(ran[k] == 0 for k in STEP_KERNELS), ran
    for name, g, w in zip(FORWARD_NAMES + BACKWARD_NAMES, got, want):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reset_after", [True, False])
def test_persistent_kernels_low_precision(emu_ops, monkeypatch, dtype, family, reset_after):
    """float16 and bfloat16 (stored in the dtype, accumulated in float): the step
    kernels' bits, and within TOL of the CPU backend."""
    args = make(3, 9, 5, 67, dtype, seed=5, lengths=True)
    want, _ = run_family(emu_ops, monkeypatch, "step", args, reset_after, True)
    got, ran = run_family(emu_ops, monkeypatch, family, args, reset_after, True)
    assert ran[f"forward_{family}"] == 1 and ran[f"backward_{family}"] == 1, ran
    cpu = run_both(torch.ops.gru_fused, *args, reset_after, True)
    for name, g, w, c in zip(FORWARD_NAMES + BACKWARD_NAMES, got, want, cpu):
        assert g.dtype == dtype and torch.equal(g, w), name
        torch.testing.assert_close(g, c, rtol=TOL[dtype], atol=TOL[dtype],
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_persistent_inference_keeps_one_step(emu_ops, monkeypatch, family):
    """gru_inference on the persistent kernels (one step's workspace slots): the bits of
    gru_forward."""
    monkeypatch.setenv("GRU_FUSED_CUDA_KERNEL", family)
    for reset_after in (True, False):
        args = make(3, 9, 5, 67, torch.float32, seed=3, lengths=True)
        emu_ops.reset_launch_counts()
        fwd = emu_ops.gru_forward(*args, reset_after, False)
        got = emu_ops.gru_inference(*args, reset_after, False)
        assert emu_ops.launch_count(f"forward_{family}") == 2
        assert torch.equal(got[0], fwd[0]) and torch.equal(got[1], fwd[1])


def test_persistent_kernels_do_not_depend_on_block_order(emu_ops, monkeypatch):
    """Three seeds of the emulator's block and thread order: the same bits, both families."""
    args = make(3, 9, 5, 67, torch.float32, seed=11, lengths=True)
    for family in FAMILIES:
        monkeypatch.setenv("GRU_FUSED_CUDA_KERNEL", family)
        assert_same_bits_in_any_order(emu_ops, args, False, family)


def test_selection_auto_step_and_fallbacks(emu_ops, monkeypatch):
    """auto (and the variable unset) runs the step kernels; persistent picks the cluster
    kernels on the emulated sm_90 and the cooperative ones on an sm_80; float64 runs the
    step kernels; a device that cannot make the blocks co-resident
    (GRU_EMU_MAX_BLOCKS_PER_SM=0: the occupancy API says none fit) refuses the persistent
    launch and the step kernels run instead, with the same results; a bad value of the
    variable is an error that names it."""
    args = make(2, 9, 3, 40, torch.float32, seed=2, lengths=False)
    want, _ = run_family(emu_ops, monkeypatch, "step", args, True, False)
    for family in ("auto", ""):
        got, ran = run_family(emu_ops, monkeypatch, family, args, True, False)
        assert ran["forward_step"] == 2 and sum(ran[k] for k in PERSISTENT_KERNELS) == 0, ran
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert run_family(emu_ops, monkeypatch, "persistent", args, True, False)[1][
        "forward_cluster"] == 1
    monkeypatch.setenv("GRU_EMU_CC", "8.0")
    got, ran = run_family(emu_ops, monkeypatch, "persistent", args, True, False)
    assert ran["forward_cooperative"] == 1 and ran["forward_cluster"] == 0, ran
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    monkeypatch.delenv("GRU_EMU_CC")
    args64 = make(2, 9, 3, 40, torch.float64, seed=2, lengths=False)
    _, ran = run_family(emu_ops, monkeypatch, "persistent", args64, True, False)
    assert ran["forward_step"] == 2 and sum(ran[k] for k in PERSISTENT_KERNELS) == 0, ran
    monkeypatch.setenv("GRU_EMU_MAX_BLOCKS_PER_SM", "0")
    for family in ("persistent", "cluster", "cooperative"):
        got, ran = run_family(emu_ops, monkeypatch, family, args, True, False)
        assert sum(ran[k] for k in PERSISTENT_KERNELS) == 0 and ran["forward_step"] == 2, ran
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    monkeypatch.delenv("GRU_EMU_MAX_BLOCKS_PER_SM")
    monkeypatch.setenv("GRU_FUSED_CUDA_KERNEL", "fastest")
    with pytest.raises((RuntimeError, ValueError),
                       match="GRU_FUSED_CUDA_KERNEL=fastest: expected auto, step"):
        emu_ops.gru_forward(*args, True, False)


def test_clusters_of_16_and_the_portable_replan(emu_ops, monkeypatch):
    """H=64 on the emulated sm_90 (16 SMs): clusters of 16 CTAs of 4 units, a
    non-portable size the kernels opt in to. Where the device finds no room for a cluster
    of 16 (GRU_EMU_MAX_CLUSTER=8, as on a GPU whose GPCs are smaller), the launch is
    refused and the call planned again with the portable 8; with no room for 8 either
    (GRU_EMU_MAX_CLUSTER=4), with 4. The cluster kernels run each time, in clusters of
    the size said, with the step kernels' bits."""
    emulated = {"cc": (9, 0), "sm_count": 16, "smem_per_block_optin": 227 * 1024,
                "cooperative": True, "clusters": True}
    plans = gru_fused.cuda_kernel_plan(64, 5, torch.float32, kernel="cluster",
                                       device_properties=emulated)
    assert [plans[d]["cluster"] for d in ("forward", "backward")] == [16, 16], plans
    args = make(2, 5, 3, 64, torch.float32, seed=7, lengths=True)
    want, _ = run_family(emu_ops, monkeypatch, "step", args, True, True)
    for max_cluster in (16, 8, 4):
        monkeypatch.setenv("GRU_EMU_MAX_CLUSTER", str(max_cluster))
        got, ran = run_family(emu_ops, monkeypatch, "cluster", args, True, True)
        assert ran["forward_cluster"] == 1 and ran["backward_cluster"] == 1, (max_cluster, ran)
        assert all(ran[k] == 0 for k in STEP_KERNELS), (max_cluster, ran)
        for kernel in ("forward_cluster", "backward_cluster"):
            assert emu_ops.last_cluster_size(kernel) == max_cluster, kernel
        for name, g, w in zip(FORWARD_NAMES + BACKWARD_NAMES, got, want):
            assert torch.equal(g, w), (max_cluster, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_gru_through_emulated_persistent_kernels(cpu_ops_routed_through_emulation,
                                                       emu_ops, monkeypatch, family):
    """A 2-layer bidirectional FusedGRU in float32, forward + backward, packed sequences
    of unequal lengths, on the persistent kernels (selection forced): against nn.GRU."""
    monkeypatch.setenv("GRU_FUSED_CUDA_KERNEL", family)
    emu_ops.reset_launch_counts()
    got, want = packed_fused_gru_against_nn_gru(torch.float32)
    assert emu_ops.launch_count(f"forward_{family}") == 4  # 2 layers x 2 directions
    assert emu_ops.launch_count(f"backward_{family}") == 4
    assert emu_ops.launch_count("forward_step") == 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


# --- torch-free programs under the sanitizers ------------------------------------------

# name: (source, sanitizer or None, planted fault or None)
PROGRAMS = {
    "kernels_address": ("sanitize_main.cpp", "address", None),
    "kernels_thread": ("sanitize_main.cpp", "thread", None),
    "missing_barrier": ("sanitize_main.cpp", "thread", "GRU_FAULT_MISSING_BARRIER"),
    "cross_block_race": ("sanitize_main.cpp", "thread", "GRU_FAULT_CROSS_BLOCK_RACE"),
    "off_by_one": ("sanitize_main.cpp", "address", "GRU_FAULT_OFF_BY_ONE"),
    "divergent_barrier": ("sanitize_main.cpp", None, "GRU_FAULT_DIVERGENT_BARRIER"),
    "missing_cluster_barrier": ("sanitize_main.cpp", "thread", "GRU_FAULT_MISSING_CLUSTER_BARRIER"),
    "missing_grid_barrier": ("sanitize_main.cpp", "thread", "GRU_FAULT_MISSING_GRID_BARRIER"),
    "missing_tile_barrier": ("sanitize_main.cpp", "thread", "GRU_FAULT_MISSING_TILE_BARRIER"),
    "dsmem_rank": ("sanitize_main.cpp", None, "GRU_FAULT_DSMEM_RANK"),
    "selftest_thread": ("emu_selftest.cpp", "thread", None),
    "selftest_address": ("emu_selftest.cpp", "address", None),
}


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """Builds every program of PROGRAMS, on all cores at once (each takes seconds);
    returns name -> executable, or the compiler's complaint."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.fail("no C++ compiler (g++) on PATH: the sanitizer tests need one")
    out = tmp_path_factory.mktemp("emu_programs")

    def build(name):
        source, sanitizer, fault = PROGRAMS[name]
        exe = out / name
        cmd = [cxx, "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-Wall",
               "-DGRU_EMULATE_CUDA", f"-I{CSRC}", str(EMU / source), "-o", str(exe), "-pthread"]
        if sanitizer:
            cmd.append(f"-fsanitize={sanitizer}")
        # Warnings fail the clean builds; a planted fault is deliberately broken code.
        cmd.append(f"-D{fault}" if fault else "-Werror")
        done = subprocess.run(cmd, capture_output=True, text=True)
        return exe if done.returncode == 0 else f"{' '.join(cmd)}\n{done.stderr[-4000:]}"

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return dict(zip(PROGRAMS, pool.map(build, PROGRAMS)))


def run_program(programs, name, *args):
    exe = programs[name]
    if not isinstance(exe, Path):
        pytest.fail(f"building {name} failed:\n{exe}")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", TSAN_OPTIONS="halt_on_error=1")
    env.pop("GRU_EMU_SEED", None)
    env.pop("GRU_EMU_WAVE_THREADS", None)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_kernels_clean_under_address_sanitizer(programs):
    """Every kernel, all configurations, values and block-order independence checked."""
    run = run_program(programs, "kernels_address")
    assert "ERROR: AddressSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "80 configurations checked, 0 failures" in run.stdout


def test_kernels_clean_under_thread_sanitizer(programs):
    """Every kernel, all configurations (one block order each: --quick)."""
    run = run_program(programs, "kernels_thread", "--quick")
    assert "WARNING: ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "80 configurations checked, 0 failures" in run.stdout


def test_thread_sanitizer_catches_missing_barrier(programs):
    """A barrier removed from the matmul: a race between threads of one block."""
    run = run_program(programs, "missing_barrier", "--quick")
    assert run.returncode != 0
    assert "WARNING: ThreadSanitizer: data race" in run.stderr
    assert "block_matmul" in run.stderr  # the tile loop whose barrier was removed


def test_thread_sanitizer_catches_cross_block_race(programs):
    """The candidate kernel overwrites r h that other blocks of the launch still read: a
    race between blocks, seen because the blocks of a launch run concurrently."""
    run = run_program(programs, "cross_block_race", "--quick")
    assert run.returncode != 0
    assert "WARNING: ThreadSanitizer: data race" in run.stderr
    assert "forward_step_kernel" in run.stderr


def test_address_sanitizer_catches_off_by_one(programs):
    run = run_program(programs, "off_by_one")
    assert run.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in run.stderr
    assert "block_matmul" in run.stderr


def test_emulator_catches_divergent_barrier(programs):
    """Threads of a partial tile return before the matmul's barriers: the launch fails,
    naming the barrier's line and the threads, instead of passing (or hanging)."""
    run = run_program(programs, "divergent_barrier")
    assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-2000:]
    assert "launch failed: gru_emu: divergent __syncthreads() at " in run.stdout
    assert "gru_kernels.cuh:" in run.stdout
    assert "returned without reaching it" in run.stdout


# The persistent kernels' planted faults: (program, family run, what must be reported).
PERSISTENT_FAULTS = {
    # A step's cluster barrier removed: CTAs read the exchange buffer their peers write.
    "missing_cluster_barrier": ("cluster", "ClusterExchange"),
    # The cooperative forward's grid barrier removed: h read from global memory while
    # other CTAs write it.
    "missing_grid_barrier": ("cooperative", "forward_persistent_kernel"),
    # No barrier between a persistent CTA's tiles: the next tile's matmul overwrites the
    # scratch the last tile's finishers still read.
    "missing_tile_barrier": ("cluster", "block_matmul"),
}


@pytest.mark.parametrize("fault", PERSISTENT_FAULTS)
def test_thread_sanitizer_catches_persistent_kernel_races(programs, fault):
    family, where = PERSISTENT_FAULTS[fault]
    run = run_program(programs, fault, "--quick", "--family", family)
    assert run.returncode != 0, run.stdout[-2000:]
    assert "WARNING: ThreadSanitizer: data race" in run.stderr, run.stderr[-3000:]
    assert where in run.stderr, run.stderr[-3000:]


def test_emulator_catches_dsmem_rank_past_the_cluster(programs):
    """The cluster exchange writes to one rank past its cluster: the launch fails, naming
    the rank and the cluster's size, instead of writing another cluster's memory."""
    run = run_program(programs, "dsmem_rank", "--quick", "--family", "cluster")
    assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-2000:]
    assert "launch failed: " in run.stdout and "out of range for a cluster of" in run.stdout


# mode: (program, expected exit status, text or texts expected in stdout + stderr)
DATA_RACE = "WARNING: ThreadSanitizer: data race"
SELFTEST = {
    "clean": ("selftest_thread", 0, "emu_selftest clean: 0 failures"),
    "divergent_site": ("selftest_thread", 3,
                       "__syncthreads() reached from different source lines in one generation"),
    "early_return": ("selftest_thread", 3, "returned without reaching it"),
    "uneven_loop": ("selftest_thread", 3, "returned without reaching it"),
    "missing_barrier": ("selftest_thread", 66, DATA_RACE),
    "cross_block_race": ("selftest_thread", 66, DATA_RACE),
    "smem_over_default": ("selftest_thread", 3, "over the 49152-byte limit a block gets "
                                                "without opting in"),
    "smem_over_opt_in": ("selftest_thread", 3, "over the 102400-byte limit the kernel opted in"),
    "opt_in_too_big": ("selftest_thread", 3, "over the 232448 bytes a block may have"),
    "block_too_big": ("selftest_thread", 3, "block (1025,1,1) of 1025 threads"),
    "address_clean": ("selftest_address", 0, "emu_selftest clean: 0 failures"),
    "stack_overflow": ("selftest_address", 1, "ERROR: AddressSanitizer: stack-buffer-overflow"),
    # Clusters, DSMEM, cooperative launches.
    "missing_cluster_sync": ("selftest_thread", 66, (DATA_RACE, "cluster_exchange")),
    "missing_grid_sync": ("selftest_thread", 66, (DATA_RACE, "grid_exchange")),
    "dsmem_rank_out_of_range": ("selftest_thread", 3,
                                "map_shared_rank: rank 4 out of range for a cluster of 4 blocks"),
    "dsmem_before_cluster_sync": ("selftest_thread", 3,
                                  "map_shared_rank: called before the first cluster barrier"),
    "dsmem_peer_exited": ("selftest_thread", 3,
                          "map_shared_rank: block (1,0,0) (rank 1 of the cluster) has exited"),
    "dsmem_after_peer_exit": ("selftest_address", 1,
                              ("ERROR: AddressSanitizer: use-after-poison", "peer_exits")),
    "cluster_peer_exited": ("selftest_thread", 3,
                            ("launch failed: gru_emu: cluster barrier at ",
                             "but block (0,0,0) of its cluster returned without reaching it")),
    "cluster_peer_failed": ("selftest_thread", 3, "launch failed: gru_emu: divergent __syncthreads()"),
    "cluster_sync_lines": ("selftest_thread", 3, "cluster barrier reached from different source "
                                                 "lines by the blocks of a cluster"),
    "mixed_barriers": ("selftest_thread", 3, "different barriers reached in one generation"),
    "watchdog": ("selftest_thread", 3, ("launch failed: gru_emu: deadlock: cluster barrier at ",
                                        "block (1,0,0) did not within GRU_EMU_WATCHDOG_S=1 s")),
    "grid_sync_outside_cooperative": ("selftest_thread", 3, "outside a cooperative launch"),
    "cluster_too_big": ("selftest_thread", 3, "a cluster of 16 blocks (CUDA allows 1..8"),
    "cluster_grid_not_multiple": ("selftest_thread", 3,
                                  "grid (6,1,1) is not a whole number of clusters of 4 blocks"),
}


@pytest.mark.parametrize("case", SELFTEST)
def test_emulator_detectors_on_toy_kernels(programs, case):
    """Each detector of the emulator, on toy kernels (tests/emu/emu_selftest.cpp): a clean
    kernel passes silently; each broken one is caught (never hangs), with a message that
    says what."""
    program, status, texts = SELFTEST[case]
    mode = "clean" if case == "address_clean" else case
    run = run_program(programs, program, mode)
    output = run.stdout + run.stderr
    assert run.returncode == status, output[-3000:]
    for text in [texts] if isinstance(texts, str) else texts:
        assert text in output, output[-3000:]
    if status == 0:
        assert "Sanitizer" not in output, output[-3000:]
