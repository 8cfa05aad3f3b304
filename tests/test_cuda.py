"""CUDA only: float32 parity with cuDNN in strict float32 and what TF32 changes, packed
input without a host synchronisation (sync debug mode, CUDA graph capture), lengths read
on another stream, and gru_inference's memory.

Every test but the first takes the ``cuda_device`` fixture: skipped, with the reason,
without a GPU or without the CUDA kernels. Nothing here touches the GPU at import.
Tests that capture CUDA graphs come last: a failed capture can leave the device in a
state that would fail the tests after it for the wrong reason.
"""
import contextlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import gru_fused
from gru_fused import FusedGRU

# Same kernels, same data: eager runs and graph replays (or runs on other streams) differ
# at most by cuBLAS choosing other GEMM kernels, rounding of a few ulps compounded over a
# few steps. float32 eps is 1.2e-7; 1e-5 leaves the margin test_module.py's TOL explains.
ROUNDING = dict(rtol=1e-5, atol=1e-5)


def _params(I, H, device, seed=0):
    """weight_ih, weight_hh, bias_ih, bias_hh at nn.GRU's scale, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,)]
    return [(torch.rand(s, generator=g) * 2 - 1).mul_(H ** -0.5).to(device).requires_grad_()
            for s in shapes]


def _op_step(x, hx, params, lengths):
    """One layer both ways over padded x [T, B, I] with lengths, forward and backward:
    [out_fwd, h_fwd, out_rev, h_rev, dx, dhx, dW_ih, dW_hh, db_ih, db_hh]."""
    out_f, h_f = gru_fused.gru(x, hx, *params, lengths=lengths)
    out_r, h_r = gru_fused.gru(x, hx, *params, reverse=True, lengths=lengths)
    loss = out_f.square().sum() + out_r.sum() + (h_f * h_r).sum()
    return [out_f, h_f, out_r, h_r, *torch.autograd.grad(loss, [x, hx, *params])]


def _assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, i=i: f"result {i}: {m}")


@contextlib.contextmanager
def _sync_is_an_error():
    """torch.cuda.set_sync_debug_mode("error") for the duration: a synchronising call
    made through PyTorch (a blocking copy, .item(), nonzero, ...) raises. It cannot see
    a raw CUDA runtime call inside an extension (cudaStreamSynchronize and the like): the
    CUDA graph captures below are the check for those."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _capture(step, static_args):
    """step(*static_args) captured in a CUDA graph after two warm-up runs on a side
    stream (cuBLAS handles and workspaces, the caching allocator, the lengths' device
    copies); returns (graph, static results)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(*static_args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = step(*static_args)
    return graph, results


def _replay_with_new_inputs(graph, static_x, static_hx):
    """Copies fresh random values into the static inputs, replays the graph, and returns
    those values as leaves that require grad (for the eager run to compare with)."""
    new_x, new_hx = torch.randn_like(static_x), torch.randn_like(static_hx)
    with torch.no_grad():
        static_x.copy_(new_x)
        static_hx.copy_(new_hx)
    graph.replay()
    return new_x.requires_grad_(), new_hx.requires_grad_()


# --- registration (needs no GPU) ------------------------------------------------------

def test_inference_kernel_registered_for_cuda():
    """gru_inference has a CUDA kernel of its own (one step's workspace), not the
    composite fallback through gru_forward that keeps all T steps'."""
    if not gru_fused.cuda_compiled():
        pytest.skip("gru_fused was built without its CUDA kernels")
    for op in ("gru_forward", "gru_inference", "gru_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gru_fused::{op}", "CUDA"), op


# --- float32 against cuDNN: strict, and with TF32 -------------------------------------

def _errors_against_float64(device, fp32_precision, cudnn_rnn):
    """Max abs errors against nn.GRU in float64 at the book's layer shape (I=28, H=256,
    B=32, T=35), over output, h_n and the gradients of input, hx and every parameter:
    (ours in float32, cuDNN's in float32 with cudnn_rnn precision, scales), each a dict
    by name. cuBLAS stays strict ('ieee') throughout."""
    I, H, B, T = 28, 256, 32, 35
    torch.manual_seed(0)
    ref = nn.GRU(I, H, device=device, dtype=torch.float64)
    nn32 = nn.GRU(I, H, device=device)
    ours = FusedGRU(I, H, device=device)
    nn32.load_state_dict(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x64 = torch.randn(T, B, I, device=device, dtype=torch.float64)
    hx64 = torch.randn(1, B, H, device=device, dtype=torch.float64)
    w_out = torch.randn(T, B, H, device=device, dtype=torch.float64)
    w_h = torch.randn(1, B, H, device=device, dtype=torch.float64)
    names = ["output", "h_n", "grad_x", "grad_hx",
             *(f"grad_{n}" for n, _ in ref.named_parameters())]

    def run(module, dtype):
        x = x64.to(dtype).requires_grad_()
        hx = hx64.to(dtype).requires_grad_()
        out, h_n = module(x, hx)
        loss = (out * w_out.to(dtype)).sum() + (h_n * w_h.to(dtype)).sum()
        grads = torch.autograd.grad(loss, [x, hx, *module.parameters()])
        return dict(zip(names, (t.detach().double() for t in (out, h_n, *grads))))

    exact = run(ref, torch.float64)
    with fp32_precision("ieee", "ieee"):
        got = run(ours, torch.float32)
    with fp32_precision(cudnn_rnn, "ieee"):
        theirs = run(nn32, torch.float32)

    def err(result):
        return {n: (result[n] - exact[n]).abs().max().item() for n in names}

    return err(got), err(theirs), {n: exact[n].abs().max().item() for n in names}


def test_float32_matches_strict_cudnn_at_book_shape_cuda(cuda_device, fp32_precision):
    """In strict float32 (cuDNN's RNN and cuBLAS without TF32), our error against float64
    is at most twice cuDNN's (flash-attention's rule) plus 1e-5 of the values' scale."""
    ours, theirs, scale = _errors_against_float64(cuda_device, fp32_precision, "ieee")
    for name in ours:
        assert ours[name] <= 2 * theirs[name] + 1e-5 * scale[name], (
            f"{name}: error {ours[name]:.3g} vs strict cuDNN's {theirs[name]:.3g} "
            f"(values up to {scale[name]:.3g})")


def test_tf32_cudnn_is_not_a_float32_reference_cuda(cuda_device, fp32_precision):
    """What PyTorch's default costs a float32 comparison: with TF32 allowed for its RNNs
    (torch.backends.cudnn.rnn.fp32_precision = 'tf32', the default), cuDNN's output is
    off by far more than 1e-5 of its scale, while ours, strict float32, is within it.
    Skipped where cuDNN keeps this shape in float32 anyway (nothing to show there)."""
    ours, theirs, scale = _errors_against_float64(cuda_device, fp32_precision, "tf32")
    _, strict, _ = _errors_against_float64(cuda_device, fp32_precision, "ieee")
    summary = ", ".join(f"{n}: ours {ours[n]:.2g}, cuDNN tf32 {theirs[n]:.2g}, "
                        f"cuDNN ieee {strict[n]:.2g}" for n in ("output", "grad_weight_hh_l0"))
    if theirs["output"] <= 4 * strict["output"]:
        pytest.skip(f"cuDNN did not use TF32 for this shape on "
                    f"{torch.cuda.get_device_name()} ({summary})")
    assert theirs["output"] > 1e-5 * scale["output"], summary
    assert ours["output"] <= 1e-5 * scale["output"], summary


# --- gru_inference keeps one step of workspace ------------------------------------------

def test_inference_keeps_one_step_of_workspace_cuda(cuda_device):
    """gru_inference equals gru_forward's output and h_n bit for bit, at a shape where the
    [4, T, B, H] workspace dominates (64 MiB), and its peak memory is lower by all but
    one step of that workspace."""
    T, B, I, H = 256, 64, 8, 256
    g = torch.Generator().manual_seed(0)
    args = [t.to(cuda_device) for t in (torch.randn(T, B, I, generator=g),
                                        torch.randn(B, H, generator=g),
                                        torch.randn(3 * H, I, generator=g) * H ** -0.5,
                                        torch.randn(3 * H, H, generator=g) * H ** -0.5,
                                        torch.randn(3 * H, generator=g),
                                        torch.randn(3 * H, generator=g))]
    lengths = torch.randint(1, T + 1, (B,), generator=g)

    def peak(op, lens):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = op(*args, lens, True, False)
        torch.cuda.synchronize()
        return result[:2], torch.cuda.max_memory_allocated() - base

    forward, inference = torch.ops.gru_fused.gru_forward, torch.ops.gru_fused.gru_inference
    for lens in (None, lengths):
        for op in (forward, inference):  # warm-up: cuBLAS workspaces, lengths' copy
            op(*args, lens, True, False)
        (out_f, h_f), peak_forward = peak(forward, lens)
        (out_i, h_i), peak_inference = peak(inference, lens)
        assert torch.equal(out_i, out_f) and torch.equal(h_i, h_f)
        saved = 4 * (T - 1) * B * H * 4
        assert peak_forward - peak_inference >= 0.95 * saved, (
            f"lengths={lens is not None}: peak {peak_forward} B for gru_forward, "
            f"{peak_inference} B for gru_inference; expected {saved} B less")


# --- lengths on the GPU -------------------------------------------------------------------

def test_lengths_copy_read_on_another_stream_cuda(cuda_device):
    """Lengths first seen on stream s1, whose copy is held back behind 50 ms of GPU work,
    then used on stream s2: s2 waits for the copy on the GPU (no host wait) and computes
    what the default stream computes afterwards. Without that wait, s2's kernels would
    read the device copy before it is written."""
    T, B, I, H = 7, 5, 4, 19
    lengths = torch.tensor([7, 2, 5, 3, 6])  # values no other test uses: a fresh copy
    params = _params(I, H, cuda_device)
    x = torch.randn(T, B, I, device=cuda_device)
    hx = torch.randn(B, H, device=cuda_device)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for s in (s1, s2):
        s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(s1):
            torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time before the copy
            out1 = gru_fused.gru(x, hx, *params, lengths=lengths)[0]
        with torch.cuda.stream(s2):
            out2 = gru_fused.gru(x, hx, *params, lengths=lengths, reverse=True)[0]
        torch.cuda.synchronize()
        want = [gru_fused.gru(x, hx, *params, lengths=lengths, reverse=r)[0]
                for r in (False, True)]
    torch.testing.assert_close(out1, want[0], **ROUNDING)
    torch.testing.assert_close(out2, want[1], **ROUNDING)


def test_no_host_sync_with_lengths_cuda(cuda_device):
    """gru() with padded lengths, forward and backward, under
    torch.cuda.set_sync_debug_mode("error"): lengths seen before (a cached device copy),
    lengths new (a pinned, asynchronous copy) and the inference op all run without a
    synchronising call that PyTorch sees (the old blocking .to(device) of lengths was
    one). One warm-up call first: lazy initialisation may synchronise."""
    T, B, I, H = 6, 4, 3, 11
    params = _params(I, H, cuda_device)
    x = torch.randn(T, B, I, device=cuda_device, requires_grad=True)
    hx = torch.randn(B, H, device=cuda_device, requires_grad=True)
    seen, new = torch.tensor([6, 1, 4, 0]), torch.tensor([2, 6, 5, 3])
    _op_step(x, hx, params, seen)
    torch.cuda.synchronize()
    with _sync_is_an_error():
        _op_step(x, hx, params, seen)
        _op_step(x, hx, params, new)
        with torch.no_grad():
            gru_fused.gru(x, hx, *params, lengths=torch.tensor([5, 5, 1, 2]))
    torch.cuda.synchronize()


def test_packed_fused_gru_without_host_sync_cuda(cuda_device):
    """A packed FusedGRU (2 layers, bidirectional, unequal unsorted lengths, hx) forward
    and backward under torch.cuda.set_sync_debug_mode("error"), after one warm-up call.
    Packing (pack_padded_sequence synchronises) happens before. Fails if anything on
    the packed path, the module's Python included, makes a synchronising call."""
    T, B, I, H = 8, 5, 6, 24
    torch.manual_seed(0)
    model = FusedGRU(I, H, num_layers=2, bidirectional=True, device=cuda_device)
    packed = pack_padded_sequence(torch.randn(T, B, I, device=cuda_device),
                                  torch.tensor([3, 8, 5, 1, 6]), enforce_sorted=False)
    hx = torch.randn(4, B, H, device=cuda_device, requires_grad=True)

    def step():
        out, h_n = model(packed, hx)
        (out.data.square().sum() + h_n.sum()).backward()

    step()
    torch.cuda.synchronize()
    with _sync_is_an_error():
        step()
    torch.cuda.synchronize()


# --- CUDA graphs (last: see the module docstring) ----------------------------------------

def test_graph_capture_with_lengths_cuda(cuda_device):
    """gru() both ways with padded lengths (unsorted, one empty, one full), forward +
    backward captured in one CUDA graph. The kernels read the lengths' device copy made
    during warm-up: the graph holds no copy. Replays on new data equal eager runs, the
    second one after gru_fused.empty_cache() (the copies a graph reads are kept)."""
    T, B, I, H = 9, 6, 5, 33
    lengths = torch.tensor([9, 4, 0, 7, 1, 9])
    params = _params(I, H, cuda_device)
    static_x = torch.randn(T, B, I, device=cuda_device, requires_grad=True)
    static_hx = torch.randn(B, H, device=cuda_device, requires_grad=True)
    graph, static_results = _capture(lambda x, hx: _op_step(x, hx, params, lengths),
                                     (static_x, static_hx))
    for replay in range(2):
        if replay == 1:
            gru_fused.empty_cache()
        new_x, new_hx = _replay_with_new_inputs(graph, static_x, static_hx)
        want = _op_step(new_x, new_hx, params, lengths)
        _assert_all_close(static_results, want, **ROUNDING)


def test_graph_capture_with_lengths_first_seen_in_capture_cuda(cuda_device):
    """Lengths seen for the first time inside the capture (the warm-up used others): the
    copy is made beside the capture, on a stream that is not capturing, so replays do
    not depend on host memory. Replays equal eager runs; eager runs after the capture
    read the same copy."""
    T, B, I, H = 11, 5, 4, 20
    params = _params(I, H, cuda_device)
    static_x = torch.randn(T, B, I, device=cuda_device, requires_grad=True)
    static_hx = torch.randn(B, H, device=cuda_device, requires_grad=True)
    warm_up = torch.tensor([11, 3, 8, 2, 9])
    in_capture = torch.tensor([10, 11, 2, 7, 4])  # values no other test uses
    gru_fused.empty_cache()
    calls = []

    def step(x, hx):
        calls.append(None)
        return _op_step(x, hx, params, warm_up if len(calls) <= 2 else in_capture)

    graph, static_results = _capture(step, (static_x, static_hx))
    assert len(calls) == 3
    for _ in range(2):
        new_x, new_hx = _replay_with_new_inputs(graph, static_x, static_hx)
        want = _op_step(new_x, new_hx, params, in_capture)
        _assert_all_close(static_results, want, **ROUNDING)


def test_graph_capture_packed_fused_gru_cuda(cuda_device):
    """A packed FusedGRU (2 layers, bidirectional, unequal unsorted lengths, hx) forward +
    backward captured in one CUDA graph; two replays with new packed data equal eager
    runs (outputs, h_n, and the gradients of the data, hx and every parameter). Needs
    the whole packed path, the module's Python included, free of synchronising calls."""
    T, B, I, H = 8, 5, 6, 24
    lengths = torch.tensor([3, 8, 5, 1, 6])
    torch.manual_seed(0)
    model = FusedGRU(I, H, num_layers=2, bidirectional=True, device=cuda_device)
    params = list(model.parameters())

    def pack(x):  # synchronises (sorting, index copies): outside the capture
        return pack_padded_sequence(x, lengths, enforce_sorted=False)

    template = pack(torch.randn(T, B, I, device=cuda_device))
    static_data = template.data.clone().requires_grad_()  # [N, I]
    static_hx = torch.randn(4, B, H, device=cuda_device, requires_grad=True)

    def step(data, hx):
        out, h_n = model(PackedSequence(data, template.batch_sizes, template.sorted_indices,
                                        template.unsorted_indices), hx)
        loss = out.data.square().sum() + h_n.sum()
        return [out.data, h_n, *torch.autograd.grad(loss, [data, hx, *params])]

    graph, static_results = _capture(step, (static_data, static_hx))
    for _ in range(2):
        new_data = pack(torch.randn(T, B, I, device=cuda_device)).data
        new_hx = torch.randn_like(static_hx)
        with torch.no_grad():
            static_data.copy_(new_data)
            static_hx.copy_(new_hx)
        graph.replay()
        want = step(new_data.clone().requires_grad_(), new_hx.requires_grad_())
        _assert_all_close(static_results, want, **ROUNDING)
