"""The CUDA kernels, executed on the CPU through the project's CUDA emulation layer.

csrc/gru_kernels.cuh is compiled with g++ and -DGRU_EMULATE_CUDA (csrc/emu/cuda_emu.h),
so every kernel the GPU build contains runs here, on machines with no GPU:

- an emulation extension (tests/emu/emu_ops.cpp) registers the CUDA backend's step
  loops for CPU tensors as torch.ops.gru_fused_emu.*; its results must match the CPU
  backend, and a whole FusedGRU forward + backward is routed through it;
- a torch-free program (tests/emu/sanitize_main.cpp) runs every kernel under
  AddressSanitizer and ThreadSanitizer, and deliberately broken variants (a missing
  barrier, an off-by-one read) must be caught by them.
"""
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
    return torch.ops.gru_fused_emu


def make(T, B, I, H, dtype, seed, lengths):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    x, hx = r(T, B, I), r(B, H)
    w_ih, w_hh = r(3 * H, I, scale=H ** -0.5), r(3 * H, H, scale=H ** -0.5)
    b_ih, b_hh = r(3 * H), r(3 * H)
    lens = torch.randint(0, T + 1, (B,), generator=g) if lengths else None
    return x, hx, w_ih, w_hh, b_ih, b_hh, lens


# H=37: two k-tiles and a partial unit tile; B=9: two batch tiles, one partial.
SHAPES = [(3, 5, 4, 37), (2, 9, 3, 8), (1, 1, 2, 3), (4, 2, 6, 33)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_emulated_kernels_match_cpu(emu_ops, shape, reset_after, reverse, lengths, dtype, tol):
    """Forward outputs, the saved workspace and every backward output equal the CPU
    backend's (float64: to rounding; float32: the kernels sum in another order)."""
    x, hx, w_ih, w_hh, b_ih, b_hh, lens = make(*shape, dtype, seed=sum(shape), lengths=lengths)
    fwd_args = (x, hx, w_ih, w_hh, b_ih, b_hh, lens, reset_after, reverse)
    want = torch.ops.gru_fused.gru_forward(*fwd_args)
    got = emu_ops.gru_forward(*fwd_args)
    for name, g, w in zip(["output", "h_n", "workspace"], got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")

    go, gh = torch.randn_like(want[0]), torch.randn_like(want[1])
    bwd = (go, gh, x, hx, w_ih, w_hh, want[0], want[2], lens, True, reset_after, reverse,
           [True] * 6)
    names = ["grad_input", "grad_hx", "grad_weight_ih", "grad_weight_hh", "grad_bias_ih",
             "grad_bias_hh"]
    for name, g, w in zip(names, emu_ops.gru_backward(*bwd), torch.ops.gru_fused.gru_backward(*bwd)):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_reduced_precision(emu_ops, dtype):
    """The half/bfloat16 instantiations (float accumulation) against float64."""
    x, hx, w_ih, w_hh, b_ih, b_hh, _ = make(5, 3, 4, 40, torch.float64, seed=3, lengths=False)
    exact = torch.ops.gru_fused.gru_forward(x, hx, w_ih, w_hh, b_ih, b_hh, None, True, False)
    low = [t.to(dtype) for t in (x, hx, w_ih, w_hh, b_ih, b_hh)]
    got = emu_ops.gru_forward(*low, None, True, False)
    assert got[0].dtype == dtype
    err = (got[0].double() - exact[0]).abs().max().item()
    # Inputs are rounded to 8 (bf16) or 11 (fp16) mantissa bits; the state stays O(1).
    assert err < (0.05 if dtype == torch.bfloat16 else 0.01), err


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


def test_fused_gru_through_emulated_kernels(cpu_ops_routed_through_emulation):
    """A 2-layer bidirectional FusedGRU, forward + backward, with packed sequences of
    unequal lengths: the emulated CUDA kernels against nn.GRU."""
    calls = cpu_ops_routed_through_emulation
    torch.manual_seed(0)
    ref = torch.nn.GRU(5, 12, num_layers=2, bidirectional=True, dtype=torch.float64)
    model = gru_fused.FusedGRU(5, 12, num_layers=2, bidirectional=True, dtype=torch.float64)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 1])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)

    results = []
    for m in (model, ref):
        m.zero_grad()
        out, h_n = m(packed)
        padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out)
        (padded.square().sum() + h_n.sum()).backward()
        results.append([padded, h_n] + [p.grad.clone() for p in m.parameters()])
    assert calls["forward"] == 4 and calls["backward"] == 4  # 2 layers x 2 directions
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_emulated_routing_is_undone(emu_ops):
    """After the routing fixture, gru_fused's CPU kernels are the native ones again."""
    x, hx, w_ih, w_hh, b_ih, b_hh, _ = make(2, 2, 3, 4, torch.float32, seed=0, lengths=False)
    with torch.autograd.profiler.profile() as prof:
        torch.ops.gru_fused.gru_forward(x, hx, w_ih, w_hh, b_ih, b_hh, None, True, False)
    assert not any("gru_fused_emu" in e.name for e in prof.function_events)


# --- sanitizers ----------------------------------------------------------------------------

def build_and_run(tmp_path, sanitizer, *defines):
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.fail("no C++ compiler (g++) on PATH: the sanitizer tests need one")
    exe = tmp_path / f"sanitize_{sanitizer}"
    cmd = [cxx, "-std=c++17", "-O1", "-g", f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer",
           "-DGRU_EMULATE_CUDA", *[f"-D{d}" for d in defines], f"-I{CSRC}",
           str(EMU / "sanitize_main.cpp"), "-o", str(exe), "-pthread"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", TSAN_OPTIONS="halt_on_error=1")
    return subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("sanitizer,report", [("address", "ERROR: AddressSanitizer"),
                                              ("thread", "WARNING: ThreadSanitizer")])
def test_kernels_clean_under_sanitizer(tmp_path, sanitizer, report):
    run = build_and_run(tmp_path, sanitizer)
    assert report not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "48 configurations checked, 0 failures" in run.stdout


def test_thread_sanitizer_catches_missing_barrier(tmp_path):
    run = build_and_run(tmp_path, "thread", "GRU_FAULT_MISSING_BARRIER")
    assert run.returncode != 0
    assert "WARNING: ThreadSanitizer: data race" in run.stderr
    assert "matmul_w_rows" in run.stderr  # the tile loop whose barrier was removed


def test_address_sanitizer_catches_off_by_one(tmp_path):
    run = build_and_run(tmp_path, "address", "GRU_FAULT_OFF_BY_ONE")
    assert run.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in run.stderr
    assert "matmul_w_rows" in run.stderr
