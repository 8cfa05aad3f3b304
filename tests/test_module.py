"""FusedGRU against torch.nn.GRU: every input form, layer stack, direction and dtype.

Each check is a private helper taking ``device``; ``_cpu`` / ``_cuda`` wrappers run it,
the CUDA one skipped (with its reason) when no GPU or no CUDA kernels are available.

Sizes are tiny (T=5, B=3, I=4, H=7) so the grids stay fast on two CPU cores.
"""
import copy
import pickle
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.utils._python_dispatch import TorchDispatchMode

from gru_fused import FusedGRU
from gru_fused.reference import gru_layer

T, B, I, H = 5, 3, 4, 7
# Unequal lengths: sorted for enforce_sorted=True, shuffled for enforce_sorted=False
# (the longest is not first, so the module must sort hx and unsort h_n).
LENGTHS = {"packed_sorted": [5, 4, 2], "packed_unsorted": [2, 5, 4]}
FORMS = ["seq_first", "batch_first", "unbatched", "packed_sorted", "packed_unsorted"]

# The fused op and nn.GRU sum the same terms in different orders (one GEMM over all
# steps vs per-step GEMMs, folded biases), so they differ by rounding only, compounded
# over T=5 steps and up to 3 layers and summed over T*B rows in weight gradients:
# a few hundred ulps. float32 eps is 1.2e-7 -> 1e-5; float64 eps is 2.2e-16 -> 1e-10
# leaves six orders of magnitude of margin while any real bug (a wrong gate, a missed
# step) shows up at 1e-2 or more.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float64: dict(rtol=1e-10, atol=1e-10)}


# ----------------------------------------------------------------------------- helpers

def _pair(*, num_layers=2, bidirectional=True, bias=True, batch_first=False, dropout=0.0,
          dtype=torch.float32, device="cpu", reset_after=True):
    """nn.GRU and FusedGRU holding the same weights (copied through the state_dict)."""
    ref = nn.GRU(I, H, num_layers, bias, batch_first, dropout, bidirectional,
                 device=device, dtype=dtype)
    fused = FusedGRU(I, H, num_layers, bias, batch_first, dropout, bidirectional,
                     device=device, dtype=dtype, reset_after=reset_after)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _make_input(form, *, batch_first=False, dtype=torch.float32, device="cpu"):
    """(module input, leaf tensor the input is made from). Packed inputs are packed from
    a padded leaf so that gradients can be compared on it."""
    if form == "unbatched":
        x = torch.randn(T, I, dtype=dtype, device=device, requires_grad=True)
        return x, x
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    if form in LENGTHS:
        packed = pack_padded_sequence(x, torch.tensor(LENGTHS[form]),
                                      batch_first=batch_first,
                                      enforce_sorted=form == "packed_sorted")
        return packed, x
    return x, x


def _make_hx(module, form, *, dtype=torch.float32, device="cpu"):
    num_directions = 2 if module.bidirectional else 1
    shape = ((module.num_layers * num_directions, H) if form == "unbatched"
             else (module.num_layers * num_directions, B, H))
    return torch.randn(shape, dtype=dtype, device=device, requires_grad=True)


def _run(module, inp, hx, leaves, seed=1):
    """Forward, then the gradient of a fixed random projection of (output, h_n) with
    respect to the input leaves and every parameter. Returns {name: tensor}."""
    out, h_n = module(inp, hx)
    out_t = out.data if isinstance(out, PackedSequence) else out
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out_t.shape, generator=gen, dtype=torch.float64).to(out_t)
    w_h = torch.randn(h_n.shape, generator=gen, dtype=torch.float64).to(h_n)
    loss = (out_t * w_out).sum() + (h_n * w_h).sum()
    # A torch.compile'd module names its parameters "_orig_mod.<name>".
    names, params = zip(*getattr(module, "_orig_mod", module).named_parameters())
    # retain_graph: a packed input's packing graph is shared by the modules compared.
    grads = torch.autograd.grad(loss, [*leaves, *params], retain_graph=True)
    result = {"output": out_t.detach(), "h_n": h_n.detach()}
    result.update({f"grad_leaf{i}": g for i, g in enumerate(grads[:len(leaves)])})
    result.update({f"grad_{n}": g for n, g in zip(names, grads[len(leaves):])})
    return result


def _assert_all_close(actual, expected, **tol):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _reference(module, x, hx, lengths=None):
    """FusedGRU's expected (output [T, B, D*H], h_n [L*D, B, H]) for seq-first x
    [T, B, I], built from gru_fused.reference.gru_layer stacked, one sequence at a time
    so that each runs over exactly its own length (steps past it are zero in output).
    Follows module.reset_after, so it covers the formula nn.GRU does not have."""
    num_directions = 2 if module.bidirectional else 1
    Tx, Bx = x.shape[:2]
    lengths = [Tx] * Bx if lengths is None else lengths
    outputs, finals = [], []
    for b in range(Bx):
        layer_input = x[:lengths[b], b:b + 1]  # [len_b, 1, I]
        h_b = []
        for layer in range(module.num_layers):
            outs = []
            for direction in range(num_directions):
                k = layer * num_directions + direction
                params = [getattr(module, n) for n in module._all_weights[k]]
                weight_ih, weight_hh = params[:2]
                bias_ih, bias_hh = params[2:] if module.bias else (None, None)
                h0 = (x.new_zeros(1, module.hidden_size) if hx is None
                      else hx[k, b:b + 1])
                out, h = gru_layer(layer_input, h0, weight_ih, weight_hh, bias_ih, bias_hh,
                                   reset_after=module.reset_after, reverse=direction == 1)
                outs.append(out)
                h_b.append(h)
            layer_input = torch.cat(outs, 2)
        pad = x.new_zeros(Tx - lengths[b], 1, layer_input.shape[2])
        outputs.append(torch.cat([layer_input, pad], 0))
        finals.append(torch.stack(h_b, 0))  # [L*D, 1, H]
    return torch.cat(outputs, 1), torch.cat(finals, 1)


# ------------------------------------------------------ parity with nn.GRU over a grid

def _check_parity_with_nn_gru(device, num_layers, bidirectional, form, bias, with_hx, dtype):
    batch_first = form == "batch_first"
    torch.manual_seed(0)
    ref, fused = _pair(num_layers=num_layers, bidirectional=bidirectional, bias=bias,
                       batch_first=batch_first, dtype=dtype, device=device)
    inp, x = _make_input(form, batch_first=batch_first, dtype=dtype, device=device)
    hx = _make_hx(ref, form, dtype=dtype, device=device) if with_hx else None
    leaves = [x] if hx is None else [x, hx]
    expected = _run(ref, inp, hx, leaves)
    actual = _run(fused, inp, hx, leaves)
    _assert_all_close(actual, expected, **TOL[dtype])


_GRID = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
_GRID_HX = pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "nohx"])
_GRID_BIAS = pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
_GRID_FORM = pytest.mark.parametrize("form", FORMS)
_GRID_DIR = pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
_GRID_LAYERS = pytest.mark.parametrize("num_layers", [1, 2, 3], ids=lambda n: f"L{n}")


@_GRID
@_GRID_HX
@_GRID_BIAS
@_GRID_FORM
@_GRID_DIR
@_GRID_LAYERS
def test_parity_with_nn_gru_cpu(num_layers, bidirectional, form, bias, with_hx, dtype):
    _check_parity_with_nn_gru("cpu", num_layers, bidirectional, form, bias, with_hx, dtype)


@_GRID
@_GRID_FORM
@_GRID_DIR
def test_parity_with_nn_gru_cuda(cuda_device, strict_fp32, bidirectional, form, dtype):
    """Against cuDNN in strict float32 (the strict_fp32 fixture: no TF32 in cuDNN's RNN
    nor in cuBLAS), where TOL's rounding argument holds; by default PyTorch lets cuDNN
    use TF32, about 1e-3 off (tests/test_cuda.py shows by how much)."""
    _check_parity_with_nn_gru(cuda_device, 2, bidirectional, form, True, True, dtype)


# ------------------------------------- both formulas against the stacked Python reference

def _check_against_reference(device, reset_after, num_layers, bidirectional, form, dtype):
    """Covers reset_after=False, which nn.GRU cannot check, and checks the packed
    semantics independently of nn.GRU (the reference runs each sequence alone)."""
    batch_first = form == "batch_first"
    torch.manual_seed(0)
    _, fused = _pair(num_layers=num_layers, bidirectional=bidirectional,
                     batch_first=batch_first, dtype=dtype, device=device,
                     reset_after=reset_after)
    inp, x = _make_input(form, batch_first=batch_first, dtype=dtype, device=device)
    hx = _make_hx(fused, form, dtype=dtype, device=device)

    out, h_n = fused(inp, hx)
    # Bring the fused result and the inputs to seq-first, batched, zero-padded form.
    lengths = LENGTHS.get(form)
    if isinstance(out, PackedSequence):
        out, _ = pad_packed_sequence(out)
    elif form == "unbatched":
        out, h_n = out.unsqueeze(1), h_n.unsqueeze(1)
    elif batch_first:
        out = out.transpose(0, 1)
    x_sf = x.unsqueeze(1) if form == "unbatched" else (x.transpose(0, 1) if batch_first else x)
    hx_b = hx.unsqueeze(1) if form == "unbatched" else hx
    ref_out, ref_h_n = _reference(fused, x_sf, hx_b, lengths)

    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    w_h = torch.randn(h_n.shape, generator=gen, dtype=torch.float64).to(h_n)
    leaves = [x, hx, *fused.parameters()]
    actual = [out, h_n, *torch.autograd.grad((out * w_out).sum() + (h_n * w_h).sum(), leaves)]
    expected = [ref_out, ref_h_n, *torch.autograd.grad(
        (ref_out * w_out).sum() + (ref_h_n * w_h).sum(), leaves)]
    names = ["output", "h_n", "grad_input", "grad_hx",
             *(f"grad_{n}" for n, _ in fused.named_parameters())]
    _assert_all_close(dict(zip(names, actual)), dict(zip(names, expected)), **TOL[dtype])


@_GRID
@_GRID_FORM
@_GRID_DIR
@pytest.mark.parametrize("num_layers", [1, 2], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_against_reference_cpu(reset_after, num_layers, bidirectional, form, dtype):
    _check_against_reference("cpu", reset_after, num_layers, bidirectional, form, dtype)


@_GRID_FORM
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_against_reference_cuda(cuda_device, reset_after, form):
    _check_against_reference(cuda_device, reset_after, 2, True, form, torch.float64)


# ------------------------------------------------------------------- float64 gradcheck

def _check_gradcheck(device, reset_after, packed):
    torch.manual_seed(0)
    Tg, Bg, Ig, Hg = 3, 2, 2, 2
    gru = FusedGRU(Ig, Hg, num_layers=2, bidirectional=True, dtype=torch.float64,
                   device=device, reset_after=reset_after)
    names = [n for n, _ in gru.named_parameters()]
    x = torch.randn(Tg, Bg, Ig, dtype=torch.float64, device=device, requires_grad=True)
    hx = torch.randn(4, Bg, Hg, dtype=torch.float64, device=device, requires_grad=True)

    def f(x, hx, *params):
        inp = (pack_padded_sequence(x, torch.tensor([2, 3]), enforce_sorted=False)
               if packed else x)
        out, h_n = torch.func.functional_call(gru, dict(zip(names, params)), (inp, hx))
        return (out.data if packed else out), h_n

    params = [p.detach().clone().requires_grad_() for p in gru.parameters()]
    assert torch.autograd.gradcheck(f, (x, hx, *params))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_gradcheck_cpu(reset_after, packed):
    _check_gradcheck("cpu", reset_after, packed)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_gradcheck_cuda(cuda_device, reset_after, packed):
    _check_gradcheck(cuda_device, reset_after, packed)


# ------------------------------------------------- construction, state_dict, repr, init

def test_same_seed_same_weights_as_nn_gru():
    # Same parameters, same registration order, same uniform(-1/sqrt(H), 1/sqrt(H)):
    # the same seed must draw identical weights.
    for kwargs in (dict(), dict(num_layers=3, bidirectional=True, bias=False)):
        torch.manual_seed(0)
        ref = nn.GRU(I, H, **kwargs)
        torch.manual_seed(0)
        fused = FusedGRU(I, H, **kwargs)
        ref_sd, fused_sd = ref.state_dict(), fused.state_dict()
        assert list(fused_sd) == list(ref_sd)
        for name in ref_sd:
            assert torch.equal(fused_sd[name], ref_sd[name]), name


def test_parameter_names_and_shapes():
    fused = FusedGRU(I, H, num_layers=2, bidirectional=True)
    shapes = {n: tuple(p.shape) for n, p in fused.named_parameters()}
    assert shapes == {
        "weight_ih_l0": (3 * H, I), "weight_hh_l0": (3 * H, H),
        "bias_ih_l0": (3 * H,), "bias_hh_l0": (3 * H,),
        "weight_ih_l0_reverse": (3 * H, I), "weight_hh_l0_reverse": (3 * H, H),
        "bias_ih_l0_reverse": (3 * H,), "bias_hh_l0_reverse": (3 * H,),
        "weight_ih_l1": (3 * H, 2 * H), "weight_hh_l1": (3 * H, H),
        "bias_ih_l1": (3 * H,), "bias_hh_l1": (3 * H,),
        "weight_ih_l1_reverse": (3 * H, 2 * H), "weight_hh_l1_reverse": (3 * H, H),
        "bias_ih_l1_reverse": (3 * H,), "bias_hh_l1_reverse": (3 * H,),
    }


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(num_layers=2, bias=False, batch_first=True, dropout=0.25, bidirectional=True),
], ids=["default", "all"])
def test_repr_matches_nn_gru(kwargs):
    assert repr(FusedGRU(I, H, **kwargs)) == repr(nn.GRU(I, H, **kwargs)).replace(
        "GRU(", "FusedGRU(", 1)
    assert repr(FusedGRU(I, H, reset_after=False, **kwargs)).endswith(", reset_after=False)")


def test_positional_arguments_as_nn_gru():
    fused = FusedGRU(I, H, 2, False, True, 0.5, True)
    assert (fused.num_layers, fused.bias, fused.batch_first, fused.dropout,
            fused.bidirectional) == (2, False, True, 0.5, True)


def test_flatten_parameters_exists_and_keeps_weights():
    fused = FusedGRU(I, H, num_layers=2)
    before = {n: p.clone() for n, p in fused.named_parameters()}
    fused.flatten_parameters()
    for n, p in fused.named_parameters():
        assert torch.equal(p, before[n])


def _check_state_dict_round_trip(device, direction):
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, dtype=torch.float64, device=device)
    src = (nn.GRU if direction == "nn_to_fused" else FusedGRU)(I, H, **kwargs)
    dst = (FusedGRU if direction == "nn_to_fused" else nn.GRU)(I, H, **kwargs)
    dst.load_state_dict(src.state_dict())  # strict: same keys, same shapes
    inp, x = _make_input("packed_unsorted", dtype=torch.float64, device=device)
    hx = _make_hx(src, "seq_first", dtype=torch.float64, device=device)
    _assert_all_close(_run(dst, inp, hx, [x, hx]), _run(src, inp, hx, [x, hx]),
                      **TOL[torch.float64])


@pytest.mark.parametrize("direction", ["nn_to_fused", "fused_to_nn"])
def test_state_dict_round_trip_cpu(direction):
    _check_state_dict_round_trip("cpu", direction)


@pytest.mark.parametrize("direction", ["nn_to_fused", "fused_to_nn"])
def test_state_dict_round_trip_cuda(cuda_device, direction):
    _check_state_dict_round_trip(cuda_device, direction)


def test_deepcopy_pickle_and_to_dtype():
    torch.manual_seed(0)
    fused = FusedGRU(I, H, num_layers=2, reset_after=False)
    x = torch.randn(T, B, I)
    out, _ = fused(x)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert clone.reset_after is False
        torch.testing.assert_close(clone(x)[0], out, rtol=0, atol=0)
    double = fused.double()  # RNNBase._apply re-runs flatten_parameters
    torch.testing.assert_close(double(x.double())[0], out.double(), **TOL[torch.float32])


# ------------------------------------------------------------------------ h_n is fresh

@pytest.mark.parametrize("form", FORMS)
def test_h_n_is_fresh_and_detachable_in_place(form):
    torch.manual_seed(0)
    fused = FusedGRU(I, H, num_layers=2, bidirectional=True,
                     batch_first=form == "batch_first")
    inp, _ = _make_input(form, batch_first=fused.batch_first)
    out, h_n = fused(inp)
    assert h_n._base is None, "h_n must not be a view"
    out_t = out.data if isinstance(out, PackedSequence) else out
    before = out_t.detach().clone()
    h_n.detach_()  # what the d2l training loop does between batches
    h_n.zero_()
    assert not h_n.requires_grad
    torch.testing.assert_close(out_t, before, rtol=0, atol=0)  # output untouched


# ----------------------------------------------------------------- gradients: frozen

class _RecordBackwardMasks(TorchDispatchMode):
    """Records the output_mask of every gru_backward call: what the op was asked for."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.gru_fused.gru_backward.default:
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


def test_frozen_parameters_get_no_gradient_and_no_work():
    torch.manual_seed(0)
    ref, fused = _pair(num_layers=2, bidirectional=False, dtype=torch.float64)
    frozen = {"weight_ih_l0", "bias_hh_l1"}
    for module in (ref, fused):
        for name in frozen:
            getattr(module, name).requires_grad_(False)
    x = torch.randn(T, B, I, dtype=torch.float64)  # no grad wanted for the input
    hx = torch.randn(2, B, H, dtype=torch.float64)
    hx_ref, hx_fused = hx.clone().requires_grad_(), hx.clone().requires_grad_()

    out, h_n = ref(x, hx_ref)
    (out.sum() + h_n.sum()).backward()
    out, h_n = fused(x, hx_fused)
    with _RecordBackwardMasks() as rec:
        (out.sum() + h_n.sum()).backward()

    for name, p in fused.named_parameters():
        if name in frozen:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, getattr(ref, name).grad,
                                       **TOL[torch.float64], msg=name)
    torch.testing.assert_close(hx_fused.grad, hx_ref.grad, **TOL[torch.float64])
    # What each layer's backward op was asked to compute. Backward runs layer 1 first;
    # mask order (input, hx, W_ih, W_hh, b_ih, b_hh).
    assert rec.masks == [[True, True, True, True, True, False],   # layer 1: b_hh frozen
                         [False, True, False, True, True, True]]  # layer 0: x, W_ih frozen


# ---------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("form", ["seq_first", "packed_unsorted"])
def test_dropout_matches_nn_gru_in_training_and_is_off_in_eval(form):
    torch.manual_seed(0)
    ref, fused = _pair(num_layers=3, bidirectional=True, dropout=0.5)
    inp, x = _make_input(form)
    results = {}
    for mode in ("train", "eval"):
        for module in (ref, fused):
            module.train(mode == "train")
        torch.manual_seed(1)
        expected = _run(ref, inp, None, [x])
        torch.manual_seed(1)  # nn.GRU draws its masks with torch's RNG: same seed,
        actual = _run(fused, inp, None, [x])  # same masks
        _assert_all_close(actual, expected, **TOL[torch.float32])
        results[mode] = actual["output"]
    # Training must actually have dropped something (else the above proves nothing).
    assert not torch.allclose(results["train"], results["eval"])


def test_dropout_one_zeroes_the_input_of_upper_layers():
    torch.manual_seed(0)
    fused = FusedGRU(I, H, num_layers=2, dropout=1.0).train()
    upper = nn.GRU(H, H)  # layer 1 of fused, fed zeros
    upper.weight_ih_l0, upper.weight_hh_l0 = fused.weight_ih_l1, fused.weight_hh_l1
    upper.bias_ih_l0, upper.bias_hh_l0 = fused.bias_ih_l1, fused.bias_hh_l1
    out, _ = fused(torch.randn(T, B, I))
    expected, _ = upper(torch.zeros(T, B, H))
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


# ------------------------------------------------------------------------- bfloat16

def test_bfloat16_cpu_error_at_most_twice_nn_gru():
    """bfloat16 is checked by comparing errors, not by a magic tolerance: against a
    float64 reference, FusedGRU (float32 accumulation) must err at most twice as much
    as nn.GRU does in bfloat16."""
    torch.manual_seed(0)
    ref64, _ = _pair(num_layers=2, bidirectional=True, dtype=torch.float64)
    ref16, fused16 = copy.deepcopy(ref64).bfloat16(), FusedGRU(
        I, H, num_layers=2, bidirectional=True, dtype=torch.bfloat16)
    fused16.load_state_dict(ref16.state_dict())
    # Round the float64 model to bfloat16-representable weights and inputs, so all
    # three compute from the same numbers and only the arithmetic differs.
    ref64.load_state_dict({k: v.double() for k, v in ref16.state_dict().items()})
    x64 = torch.randn(T, B, I, dtype=torch.bfloat16).double().requires_grad_()
    hx64 = torch.randn(4, B, H, dtype=torch.bfloat16).double().requires_grad_()
    x16 = x64.detach().bfloat16().requires_grad_()
    hx16 = hx64.detach().bfloat16().requires_grad_()

    exact = _run(ref64, x64, hx64, [x64, hx64])
    torch_err = {k: (v.double() - exact[k]).abs().max().item()
                 for k, v in _run(ref16, x16, hx16, [x16, hx16]).items()}
    fused = _run(fused16, x16, hx16, [x16, hx16])
    for k, v in fused.items():
        assert v.dtype == torch.bfloat16, k
        err = (v.double() - exact[k]).abs().max().item()
        assert err <= 2 * torch_err[k], f"{k}: fused error {err:.3g} vs nn.GRU {torch_err[k]:.3g}"


# ---------------------------------------------------------------------- NaN and inf

def test_nan_and_inf_propagate_like_nn_gru():
    torch.manual_seed(0)
    ref, fused = _pair(num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    x[1, 0, 2] = float("nan")  # sequence 0 becomes NaN from step 1 on (both directions)
    x[2, 1, 0] = float("inf")  # saturates the gates of sequence 1, stays finite
    x[3, 2, 1] = -float("inf")
    x.requires_grad_()
    expected = _run(ref, x, None, [x])
    actual = _run(fused, x, None, [x])
    assert expected["output"].isnan().any() and not expected["output"].isnan().all()
    for name in ("output", "h_n"):
        torch.testing.assert_close(actual[name], expected[name], equal_nan=True,
                                   **TOL[torch.float64])
    # The gradients are NaN wherever nn.GRU's are (NaN times anything stays NaN).
    for name in expected:
        assert torch.equal(actual[name].isnan(), expected[name].isnan()), name


# ------------------------------------------------------------------------- bad input

def _raises_like_nn_gru(exc, message, ref, fused, *args):
    """Both modules raise exc with this exact message."""
    for module in (ref, fused):
        with pytest.raises(exc, match=f"^{re.escape(message)}$"):
            module(*args)


def test_bad_input_rank():
    ref, fused = _pair()
    for rank in (1, 4):
        x = torch.randn(*([2] * (rank - 1)), I)
        _raises_like_nn_gru(ValueError, f"GRU: Expected input to be 2D or 3D, got {rank}D "
                            "instead", ref, fused, x)


def test_bad_input_size():
    ref, fused = _pair()
    _raises_like_nn_gru(RuntimeError, f"input.size(-1) must be equal to input_size. "
                        f"Expected {I}, got {I + 1}", ref, fused, torch.randn(T, B, I + 1))
    packed = pack_padded_sequence(torch.randn(T, B, I + 1), torch.tensor([5, 4, 2]))
    _raises_like_nn_gru(RuntimeError, f"input.size(-1) must be equal to input_size. "
                        f"Expected {I}, got {I + 1}", ref, fused, packed)


def test_bad_input_dtype():
    ref, fused = _pair()
    _raises_like_nn_gru(
        ValueError, "RNN input dtype (torch.float64) does not match weight dtype "
        "(torch.float32). Convert input: input.to(torch.float32), or convert model: "
        "model.to(torch.float64)", ref, fused, torch.randn(T, B, I, dtype=torch.float64))


def test_empty_sequence():
    ref, fused = _pair()
    _raises_like_nn_gru(RuntimeError, "Expected sequence length to be larger than 0 in RNN",
                        ref, fused, torch.randn(0, B, I))


def test_bad_hx_shape_for_layers_and_directions():
    ref, fused = _pair(num_layers=2, bidirectional=True)  # wants hx [4, B, H]
    x = torch.randn(T, B, I)
    _raises_like_nn_gru(RuntimeError, f"Expected hidden size (4, {B}, {H}), got [2, {B}, {H}]",
                        ref, fused, x, torch.zeros(2, B, H))
    _raises_like_nn_gru(RuntimeError, f"Expected hidden size (4, 1, {H}), got [4, 1, {H + 1}]",
                        ref, fused, x[:, 0], torch.zeros(4, H + 1))
    _raises_like_nn_gru(RuntimeError, f"Expected hidden size (4, 3, {H}), got [4, 2, {H}]",
                        ref, fused, pack_padded_sequence(x, torch.tensor([5, 4, 2])),
                        torch.zeros(4, 2, H))
    _raises_like_nn_gru(RuntimeError, "For batched 3-D input, hx should also be 3-D but got "
                        "2-D tensor", ref, fused, x, torch.zeros(4, H))
    _raises_like_nn_gru(RuntimeError, "For unbatched 2-D input, hx should also be 2-D but "
                        "got 3-D tensor", ref, fused, x[:, 0], torch.zeros(4, 1, H))


def test_hx_and_parameters_on_another_device():
    # The "meta" device stands in for a GPU so that this runs on any machine.
    ref, fused = _pair()
    x = torch.randn(T, B, I)
    _raises_like_nn_gru(RuntimeError, "Input and hidden tensors are not at the same device, "
                        "found input tensor at cpu and hidden tensor at meta",
                        ref, fused, x, torch.zeros(4, B, H, device="meta"))
    _raises_like_nn_gru(RuntimeError, "Input and parameter tensors are not at the same "
                        "device, found input tensor at cpu and parameter tensor at meta",
                        ref.to("meta"), fused.to("meta"), x)


def test_hx_dtype():
    # nn.GRU only fails deep inside a matmul here ("mat1 and mat2 must have the same
    # dtype"); FusedGRU names the tensor and the fix.
    _, fused = _pair()
    with pytest.raises(ValueError, match=re.escape(
            "RNN hx dtype (torch.float64) does not match input dtype (torch.float32). "
            "Convert hx: hx.to(torch.float32)")):
        fused(torch.randn(T, B, I), torch.zeros(4, B, H, dtype=torch.float64))


def test_unsorted_packed_sequences():
    x = torch.randn(T, B, I)
    # Packing unsorted lengths with enforce_sorted=True is refused by torch itself...
    with pytest.raises(RuntimeError, match="must be sorted in decreasing order"):
        pack_padded_sequence(x, torch.tensor([2, 5, 4]), enforce_sorted=True)
    # ...but a hand-built PackedSequence can still claim increasing batch sizes, which
    # nn.GRU turns into a shape error deep inside; FusedGRU says what is wrong.
    _, fused = _pair()
    bad = PackedSequence(torch.randn(3, I), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=re.escape(
            "PackedSequence batch_sizes must be non-increasing (sequences sorted by "
            "decreasing length), got [1, 2]")):
        fused(bad)
    bad = PackedSequence(torch.randn(4, I), torch.tensor([2, 1]))
    with pytest.raises(RuntimeError, match=re.escape(
            "PackedSequence data has 4 rows but its batch_sizes sum to 3")):
        fused(bad)


@pytest.mark.parametrize("dropout", [-0.1, 1.5, True, "0.5"])
def test_bad_dropout(dropout):
    message = ("dropout should be a number in range [0, 1] representing the probability "
               "of an element being zeroed")
    for cls in (nn.GRU, FusedGRU):
        with pytest.raises(ValueError, match=re.escape(message)):
            cls(I, H, num_layers=2, dropout=dropout)


def test_bad_constructor_arguments_like_nn_gru():
    for kwargs, exc, message in [
        (dict(hidden_size=0), ValueError, "hidden_size must be greater than zero"),
        (dict(num_layers=0), ValueError, "num_layers must be greater than zero"),
        (dict(bias=1), TypeError, "bias should be of type bool, got: int"),
        (dict(batch_first=None), TypeError, "batch_first should be of type bool, got: NoneType"),
    ]:
        args = dict(input_size=I, hidden_size=H)
        args.update(kwargs)
        for cls in (nn.GRU, FusedGRU):
            with pytest.raises(exc, match=f"^{re.escape(message)}$"):
                cls(**args)
    with pytest.raises(TypeError, match="reset_after should be of type bool, got: int"):
        FusedGRU(I, H, reset_after=1)


# ---------------------------------------------------------------------- torch.compile

def _check_compile_matches_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = FusedGRU(I, H, num_layers=2, bidirectional=True, device=device,
                     dtype=torch.float64)
    compiled = torch.compile(eager, fullgraph=True)  # fullgraph: any graph break fails
    x = torch.randn(T, B, I, dtype=torch.float64, device=device, requires_grad=True)
    hx = torch.randn(4, B, H, dtype=torch.float64, device=device, requires_grad=True)
    _assert_all_close(_run(compiled, x, hx, [x, hx]), _run(eager, x, hx, [x, hx]),
                      **TOL[torch.float64])


def test_compile_matches_eager_cpu():
    _check_compile_matches_eager("cpu")


def test_compile_matches_eager_cuda(cuda_device):
    _check_compile_matches_eager(cuda_device)
