"""The registered ops: gradients, parity with nn.GRU and the reference, opcheck,
torch.compile, input validation, lengths and determinism.

Each check is a private helper taking ``device``; ``_cpu`` and ``_cuda`` wrappers run it
(the CUDA one skips with a reason when no GPU or no CUDA kernels).
"""
import itertools

import pytest
import torch

import gru_fused
from gru_fused import reference

VARIANTS = list(itertools.product([True, False], [False, True], [True, False]))
VARIANT_IDS = [f"{'after' if ra else 'before'}-{'rev' if rv else 'fwd'}-{'bias' if b else 'nobias'}"
               for ra, rv, b in VARIANTS]


def make_args(T, B, I, H, bias=True, dtype=torch.float64, device="cpu", requires_grad=True,
              seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        t = torch.randn(*shape, generator=g, dtype=dtype).to(device)
        return t.requires_grad_(requires_grad)

    x, hx = rnd(T, B, I), rnd(B, H)
    w_ih, w_hh = rnd(3 * H, I), rnd(3 * H, H)
    b_ih, b_hh = (rnd(3 * H), rnd(3 * H)) if bias else (None, None)
    return x, hx, w_ih, w_hh, b_ih, b_hh


def grads_of(fn, args, seed=1):
    """Output, h_n and the gradients of a fixed random projection of both."""
    out, h_n = fn(*args)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    gh = torch.randn(h_n.shape, generator=g, dtype=out.dtype).to(out.device)
    leaves = [a for a in args if a is not None and a.requires_grad]
    grads = torch.autograd.grad((out * go).sum() + (h_n * gh).sum(), leaves)
    return [out, h_n, *grads]


def fused(reset_after, reverse, lengths=None):
    return lambda *a: gru_fused.gru(*a, reset_after=reset_after, reverse=reverse,
                                    lengths=lengths)


# --- gradcheck ------------------------------------------------------------------------

def _gradcheck(device, reset_after, reverse, bias, shape):
    args = make_args(*shape, bias=bias, device=device)
    assert torch.autograd.gradcheck(fused(reset_after, reverse), args)


@pytest.mark.parametrize("reset_after,reverse,bias", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (4, 3, 5, 7)], ids=["T1B1H5", "T4B3H7"])
def test_gradcheck_cpu(reset_after, reverse, bias, shape):
    _gradcheck("cpu", reset_after, reverse, bias, shape)


@pytest.mark.parametrize("reset_after,reverse,bias", VARIANTS, ids=VARIANT_IDS)
def test_gradcheck_cuda(cuda_device, reset_after, reverse, bias):
    _gradcheck(cuda_device, reset_after, reverse, bias, (4, 3, 5, 37))


# --- parity with the reference and with nn.GRU ----------------------------------------

def _matches_reference(device, reset_after, reverse, bias, dtype, tol):
    args = make_args(6, 4, 5, 9, bias=bias, dtype=dtype, device=device)
    got = grads_of(fused(reset_after, reverse), args)
    want = grads_of(lambda *a: reference.gru_layer(*a, reset_after, reverse), args)
    for name, g, w in zip(["output", "h_n", "grads..."], got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    assert len(got) == len(want)


@pytest.mark.parametrize("reset_after,reverse,bias", VARIANTS, ids=VARIANT_IDS)
def test_matches_reference_cpu(reset_after, reverse, bias):
    # float64: both sides compute the same formula; only rounding order differs.
    _matches_reference("cpu", reset_after, reverse, bias, torch.float64, 1e-12)


@pytest.mark.parametrize("reset_after,reverse,bias", VARIANTS, ids=VARIANT_IDS)
def test_matches_reference_cuda(cuda_device, reset_after, reverse, bias):
    _matches_reference(cuda_device, reset_after, reverse, bias, torch.float64, 1e-12)


def _matches_nn_gru(device, dtype, tol, bias, reverse):
    """reset_after=True is nn.GRU: copy the weights, compare outputs and all gradients."""
    T, B, I, H = 7, 3, 6, 11
    torch.manual_seed(0)
    ref = torch.nn.GRU(I, H, bias=bias, bidirectional=reverse, dtype=dtype, device=device)
    sfx = "_reverse" if reverse else ""
    params = [getattr(ref, f"weight_ih_l0{sfx}"), getattr(ref, f"weight_hh_l0{sfx}")]
    params += [getattr(ref, f"bias_ih_l0{sfx}"), getattr(ref, f"bias_hh_l0{sfx}")] if bias else [None, None]
    x = torch.randn(T, B, I, dtype=dtype, device=device, requires_grad=True)
    hx = torch.randn(B, H, dtype=dtype, device=device, requires_grad=True)

    def nn_gru(x, hx, *_):
        if not reverse:
            out, h_n = ref(x, hx[None])
            return out, h_n[0]
        # The reverse direction of a bidirectional nn.GRU is our reverse=True.
        out, h_n = ref(x, torch.stack([torch.zeros_like(hx), hx]))
        return out[..., H:], h_n[1]

    args = (x, hx, *params)
    got = grads_of(fused(True, reverse), args)
    want = grads_of(nn_gru, args)
    assert len(got) == len(want) == 6 + 2 * bias
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_matches_nn_gru_cpu(dtype, tol, bias, reverse):
    _matches_nn_gru("cpu", dtype, tol, bias, reverse)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_nn_gru_cuda(cuda_device, strict_fp32, bias, reverse):
    """Against cuDNN in strict float32 (the strict_fp32 fixture: no TF32 in cuDNN's RNN
    nor in cuBLAS): then the two differ in summation order only, as on the CPU, so the
    CPU's 1e-5 holds. PyTorch's default lets cuDNN use TF32, about 1e-3 off."""
    _matches_nn_gru(cuda_device, torch.float32, 1e-5, bias, reverse)


# --- reduced precision -----------------------------------------------------------------

def _low_precision_error(device, dtype, one_hot=False):
    """The fused result's error against float64 is at most twice nn.GRU's own error in
    the same dtype (flash-attention's rule), both for outputs and gradients."""
    args64 = make_args(8, 4, 16, 32, dtype=torch.float64, device=device)
    if one_hot:
        args64 = (one_hot_like(args64[0]), *args64[1:])
    with torch.no_grad():  # nn.GRU's init scale, so the recurrence is not chaotic
        for w in args64[2:]:
            w.mul_(32 ** -0.5)
    exact = grads_of(fused(True, False), args64)
    low = [a.detach().to(dtype).requires_grad_() for a in args64]
    got = grads_of(fused(True, False), low)

    gru = torch.nn.GRU(16, 32, device=device, dtype=dtype)
    with torch.no_grad():
        for p, src in zip([gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0],
                          low[2:]):
            p.copy_(src)
    x, hx = low[0].detach().requires_grad_(), low[1].detach().requires_grad_()

    def nn_gru(x, hx, *_):
        out, h_n = gru(x, hx[None])
        return out, h_n[0]

    theirs = grads_of(nn_gru, (x, hx, *gru.parameters()))
    for name, e, g, t in zip(["output", "h_n", "x", "hx", "w_ih", "w_hh", "b_ih", "b_hh"],
                             exact, got, theirs):
        ours_err = (g.double() - e).abs().max().item()
        their_err = (t.double() - e).abs().max().item()
        assert ours_err <= 2 * their_err + 1e-6, f"{name}: {ours_err} vs nn.GRU's {their_err}"


def test_bfloat16_error_cpu():
    _low_precision_error("cpu", torch.bfloat16)


def test_bfloat16_one_hot_error_cpu():
    _low_precision_error("cpu", torch.bfloat16, one_hot=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_cuda(cuda_device, dtype):
    _low_precision_error(cuda_device, dtype)


# --- lengths ----------------------------------------------------------------------------

def _lengths(device, reset_after, reverse):
    """Sequence b runs its own lengths[b] steps; h_n is its state after them; padded
    steps carry the state and receive no gradient through the gates."""
    T, B, I, H = 6, 4, 3, 5
    lengths = torch.tensor([6, 3, 1, 0])
    args = make_args(T, B, I, H, device=device)
    got = grads_of(fused(reset_after, reverse, lengths), args)
    out, h_n = got[0], got[1]
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            torch.testing.assert_close(h_n[b], args[1][b])
            continue
        sub = (args[0][:n, b:b + 1], args[1][b:b + 1], *args[2:])
        o, h = reference.gru_layer(*sub, reset_after, reverse)
        torch.testing.assert_close(out[:n, b:b + 1], o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n[b:b + 1], h, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused(reset_after, reverse, lengths), args)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_lengths_cpu(reset_after, reverse):
    _lengths("cpu", reset_after, reverse)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_lengths_cuda(cuda_device, reset_after, reverse):
    _lengths(cuda_device, reset_after, reverse)


# --- opcheck and torch.compile -----------------------------------------------------------

def _opcheck(device, requires_grad, reset_after):
    args = make_args(3, 2, 4, 5, device=device, requires_grad=requires_grad)
    lengths = torch.tensor([3, 2])
    torch.library.opcheck(torch.ops.gru_fused.gru_forward.default,
                          (*args, None, reset_after, False))
    torch.library.opcheck(torch.ops.gru_fused.gru_forward.default,
                          (*args, lengths, reset_after, True))
    with torch.no_grad():
        out, h_n, ws = torch.ops.gru_fused.gru_forward(*args, None, reset_after, False)
    # gru_backward's own backward only raises (test_double_backward_raises): its opcheck
    # takes constants.
    constant = tuple(a.detach() for a in args)
    for mask in ([True] * 6, [False, True, False, True, True, False]):
        bw_args = (torch.randn_like(out), torch.randn_like(h_n), *constant[:4], out, ws, None,
                   True, reset_after, False, mask)
        torch.library.opcheck(torch.ops.gru_fused.gru_backward.default, bw_args)
    # gru_inference has no autograd: it is only called when no gradient can be taken.
    torch.library.opcheck(torch.ops.gru_fused.gru_inference.default,
                          (*constant, lengths, reset_after, True))


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("reset_after", [True, False])
def test_opcheck_cpu(requires_grad, reset_after):
    _opcheck("cpu", requires_grad, reset_after)


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("reset_after", [True, False])
def test_opcheck_cuda(cuda_device, requires_grad, reset_after):
    _opcheck(cuda_device, requires_grad, reset_after)


def _compile_matches_eager(device, reset_after):
    torch.manual_seed(0)
    model = gru_fused.FusedGRU(5, 7, reset_after=reset_after, device=device)
    x = torch.randn(4, 3, 5, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = grads_of(lambda x: compiled(x), (x.requires_grad_(),))
    want = grads_of(lambda x: model(x), (x,))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # The parameters' gradients too.
    model.zero_grad()
    compiled(x)[0].sum().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x)[0].sum().backward()
    for g, p in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("reset_after", [True, False])
def test_compile_matches_eager_cpu(reset_after):
    _compile_matches_eager("cpu", reset_after)


def test_compile_matches_eager_cuda(cuda_device):
    _compile_matches_eager(cuda_device, True)


# --- determinism ---------------------------------------------------------------------------

def _deterministic(device, reset_after):
    args = make_args(9, 5, 6, 13, dtype=torch.float32, device=device)
    first = grads_of(fused(reset_after, False), args)
    second = grads_of(fused(reset_after, False), args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reset_after", [True, False])
def test_deterministic_cpu(reset_after):
    _deterministic("cpu", reset_after)


@pytest.mark.parametrize("reset_after", [True, False])
def test_deterministic_cuda(cuda_device, reset_after):
    _deterministic(cuda_device, reset_after)


# --- CPU fast paths: one-hot input, vectorized gate math, batch split across threads ----

def one_hot_like(x, seed=0):
    """A one-hot tensor shaped like x [T, B, I] (its dtype, device and requires_grad)."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.randint(0, x.shape[-1], x.shape[:-1], generator=g)
    one_hot = torch.nn.functional.one_hot(cols, x.shape[-1]).to(x.dtype).to(x.device)
    return one_hot.requires_grad_(x.requires_grad)


@pytest.mark.parametrize("reset_after,reverse,bias", VARIANTS, ids=VARIANT_IDS)
def test_one_hot_input_cpu(reset_after, reverse, bias):
    """A one-hot x takes the CPU's gather (forward) and scatter-add (dW_ih) path: float64
    gradcheck with x constant, and the reference's values and gradients, x's included."""
    x, *rest = make_args(5, 4, 6, 7, bias=bias)
    constant_x = (one_hot_like(x).detach(), *rest)
    assert torch.autograd.gradcheck(fused(reset_after, reverse), constant_x)
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:
        args = [a if a is None else a.detach().to(dtype).requires_grad_() for a in
                (one_hot_like(x), *rest)]
        got = grads_of(fused(reset_after, reverse), args)
        want = grads_of(lambda *a: reference.gru_layer(*a, reset_after, reverse), args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("reset_after,reverse", [(True, False), (False, True)])
def test_long_sequence_in_chunks_cpu(reset_after, reverse):
    """Past 32 MB of input projections ([T, B, 3H]) the CPU takes the steps in chunks,
    each with its own GEMMs: the reference's values and gradients all the same."""
    args = make_args(12, 512, 8, 512, dtype=torch.float64)  # 75 MB of gi: three chunks
    with torch.no_grad():
        for w in args[2:]:
            w.mul_(512 ** -0.5)
    got = grads_of(fused(reset_after, reverse), args)
    want = grads_of(lambda *a: reference.gru_layer(*a, reset_after, reverse), args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_gate_math_saturates_and_propagates_nan_cpu():
    """The CPU's vectorized sigmoid/tanh: huge pre-activations saturate to finite values
    (no inf - inf), and a NaN in the input reaches exactly the rows it should."""
    x, hx, w_ih, w_hh, b_ih, b_hh = make_args(4, 3, 5, 19, dtype=torch.float32,
                                              requires_grad=False)
    out, h_n = gru_fused.gru(x * 1e30, hx, w_ih, w_hh, b_ih, b_hh)
    # h' = (1 - z) n + z h_prev: between tanh's [-1, 1] and the states before it.
    assert torch.isfinite(out).all() and out.abs().max() <= max(1.0, hx.abs().max().item())
    x[2, 1, 0] = float("nan")
    out, h_n = gru_fused.gru(x, hx, w_ih, w_hh, b_ih, b_hh)
    assert torch.isnan(out[2:, 1]).all() and torch.isnan(h_n[1]).all()
    assert not torch.isnan(out[:2]).any() and not torch.isnan(out[:, [0, 2]]).any()


def _inference_matches_forward(device, reset_after, reverse):
    """gru_inference (the CPU and CUDA kernels keep one step's workspace) gives
    gru_forward's outputs bit for bit, and gru() takes it exactly when no gradient can be
    taken."""
    args = make_args(5, 4, 6, 7, dtype=torch.float32, device=device, requires_grad=False)
    lengths = torch.tensor([5, 2, 0, 4])
    for lens in (None, lengths):
        out, h_n, _ = torch.ops.gru_fused.gru_forward(*args, lens, reset_after, reverse)
        got = torch.ops.gru_fused.gru_inference(*args, lens, reset_after, reverse)
        assert torch.equal(got[0], out) and torch.equal(got[1], h_n)
        with torch.no_grad():
            assert torch.equal(gru_fused.gru(*args, reset_after=reset_after, reverse=reverse,
                                             lengths=lens)[0], out)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_inference_matches_forward_cpu(reset_after, reverse):
    _inference_matches_forward("cpu", reset_after, reverse)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_inference_matches_forward_cuda(cuda_device, reset_after, reverse):
    _inference_matches_forward(cuda_device, reset_after, reverse)


@pytest.mark.skipif(not torch.backends.mkl.is_available(),
                    reason="the claim rests on MKL giving a row the same bits in any "
                           "GEMM of 4 or more rows")
@pytest.mark.parametrize("B,H", [(8, 33), (13, 33), (32, 33), (20, 600), (32, 600)])
@pytest.mark.parametrize("reset_after", [True, False])
def test_batch_split_is_bitwise_cpu(B, H, reset_after):
    """With two threads the CPU step loops give each thread a block of the batch (with
    W_hh past 1 MiB, H = 600, only from 32 rows: below, MKL's threaded GEMMs); the
    results are bitwise those of one thread."""
    args = make_args(6, B, 5, H, dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads_of(fused(reset_after, False), args)
        torch.set_num_threads(2)
        two = grads_of(fused(reset_after, False), args)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# --- bad input --------------------------------------------------------------------------

def call(x, hx, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None):
    return torch.ops.gru_fused.gru_forward(x, hx, w_ih, w_hh, b_ih, b_hh, lengths, True, False)


def good(dtype=torch.float32):
    return make_args(3, 2, 4, 5, dtype=dtype, requires_grad=False)


@pytest.mark.parametrize("mutate,message", [
    (lambda a: (a[0][0], *a[1:]), r"input must be a 3-D tensor \[T, B, I\], got a 2-D"),
    (lambda a: (a[0].long(), *a[1:]), r"input must be a floating point tensor"),
    (lambda a: (a[0], a[1][:1], *a[2:]), r"hx must have shape \[2, 5\]"),
    (lambda a: (a[0], a[1], a[2][:, :3], *a[3:]), r"weight_ih must have shape \[15, 4\]"),
    (lambda a: (a[0], a[1], a[2], a[3][:14], *a[4:]), r"weight_hh must have shape \[15, 5\]"),
    (lambda a: (a[0], a[1], a[2], a[3], a[4][:3], a[5]), r"bias_ih must have shape \[15\]"),
    (lambda a: (a[0], a[1], a[2], a[3], a[4], None), r"bias_ih and bias_hh must be given together"),
    (lambda a: (a[0], a[1].double(), *a[2:]), r"hx has dtype Double but input has dtype Float"),
    (lambda a: (a[0], a[1], a[2].double(), *a[3:]), r"weight_ih has dtype Double"),
    (lambda a: (a[0][:0], a[1], *a[2:]), r"input must have at least one step"),
])
def test_bad_input_messages(mutate, message):
    with pytest.raises(RuntimeError, match=message):
        call(*mutate(good()))


@pytest.mark.parametrize("lengths,message", [
    (torch.tensor([3, 4]), r"lengths must lie in \[0, T\] = \[0, 3\], got values in \[3, 4\]"),
    (torch.tensor([3.0, 1.0]), r"lengths must be a 1-D int64 tensor of size B = 2"),
    (torch.tensor([3]), r"lengths must be a 1-D int64 tensor of size B = 2"),
])
def test_bad_lengths_messages(lengths, message):
    with pytest.raises(RuntimeError, match=message):
        call(*good(), lengths=lengths)


def test_device_mismatch_cuda(cuda_device):
    args = list(good())
    with pytest.raises(RuntimeError, match=r"weight_hh is on cpu but input is on cuda"):
        call(args[0].cuda(), args[1].cuda(), args[2].cuda(), *args[3:])
    with pytest.raises(RuntimeError, match=r"lengths must be a CPU tensor"):
        call(*[a.cuda() for a in args], lengths=torch.tensor([3, 1], device=cuda_device))


def test_backward_rejects_mismatched_workspace():
    args = good()
    out, h_n, ws = call(*args)
    with pytest.raises(RuntimeError, match=r"workspace must have shape \[4, 3, 2, 5\]"):
        torch.ops.gru_fused.gru_backward(out, h_n, *args[:4], out, ws[:, :2], None, True,
                                         True, False, [True] * 6)


def test_empty_batch():
    """B = 0 works as in nn.GRU: empty outputs, zero parameter gradients."""
    x, hx, w_ih, w_hh, b_ih, b_hh = make_args(3, 0, 4, 5)
    out, h_n = gru_fused.gru(x, hx, w_ih, w_hh, b_ih, b_hh)
    assert out.shape == (3, 0, 5) and h_n.shape == (0, 5)
    (out.sum() + h_n.sum()).backward()
    for p in (w_ih, w_hh, b_ih, b_hh):
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_hx_none_means_zeros():
    x, hx, w_ih, w_hh, b_ih, b_hh = good()
    got = gru_fused.gru(x, None, w_ih, w_hh, b_ih, b_hh)
    want = gru_fused.gru(x, torch.zeros_like(hx), w_ih, w_hh, b_ih, b_hh)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_h_n_is_not_a_view():
    x, hx, w_ih, w_hh, b_ih, b_hh = good()
    out, h_n = gru_fused.gru(x, hx, w_ih, w_hh, b_ih, b_hh)
    assert h_n._base is None and h_n.data_ptr() != out[-1].data_ptr()
    torch.testing.assert_close(h_n, out[-1])


def test_masked_backward_skips_gradients():
    """Parameters with requires_grad=False get no gradient and no work."""
    x, hx, w_ih, w_hh, b_ih, b_hh = make_args(3, 2, 4, 5)
    w_ih.requires_grad_(False)
    b_ih.requires_grad_(False)
    out, h_n = gru_fused.gru(x, hx, w_ih, w_hh, b_ih, b_hh)
    (out.sum() + h_n.sum()).backward()
    assert w_ih.grad is None and b_ih.grad is None
    assert x.grad is not None and w_hh.grad is not None and b_hh.grad is not None


def test_double_backward_raises():
    """A second derivative is not supported: it raises instead of coming out as zeros."""
    x, hx, w_ih, w_hh, b_ih, b_hh = make_args(3, 2, 4, 5)
    out, _ = gru_fused.gru(x, hx, w_ih, w_hh, b_ih, b_hh)
    (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives are not supported"):
        torch.autograd.grad(g.sum(), x)


# --- CUDA graphs -------------------------------------------------------------------------

def test_cuda_graph_capture_and_replay_cuda(cuda_device):
    """Forward + backward are captured in one CUDA graph (no host sync, no allocation in
    the step loops) and a replay on new input equals eager execution."""
    torch.manual_seed(0)
    model = gru_fused.FusedGRU(6, 40, device=cuda_device)
    params = list(model.parameters())
    static_x = torch.randn(7, 5, 6, device=cuda_device, requires_grad=True)

    def step(x):
        out, h_n = model(x)
        return [out, h_n, *torch.autograd.grad(out.square().sum() + h_n.sum(), [x, *params])]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture (cuBLAS handles, caching allocator)
            step(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_results = step(static_x)

    new_x = torch.randn_like(static_x)
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    want = step(new_x.requires_grad_())
    for g, w in zip(static_results, want):
        torch.testing.assert_close(g, w)
