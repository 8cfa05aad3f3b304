"""gru_fused.scratch against the d2l book's Python code (gru_fused.reference.d2l_gru).

Each check is a private helper taking ``device``, with ``_cpu`` / ``_cuda`` wrappers.
"""
import re

import pytest
import torch
import torch.nn.functional as F

from gru_fused import scratch
from gru_fused.reference import d2l_gru

# The book's sizes are vocab 28, 256 hidden units, 35 steps, batch 32; these keep the
# same shape of problem at a fraction of the cost.
V, HID, T, B = 11, 6, 5, 3

# One fused op and one output GEMM against the book's per-step matmuls: the same terms
# summed in different orders, so rounding differences only (see test_module.TOL).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _book_get_params(vocab_size, num_hiddens, device):
    """The book's get_params, verbatim, to check ours draws the same numbers."""
    num_inputs = num_outputs = vocab_size

    def normal(shape):
        return torch.randn(size=shape, device=device) * 0.01

    def three():
        return (normal((num_inputs, num_hiddens)), normal((num_hiddens, num_hiddens)),
                torch.zeros(num_hiddens, device=device))

    W_xz, W_hz, b_z = three()
    W_xr, W_hr, b_r = three()
    W_xh, W_hh, b_h = three()
    W_hq = normal((num_hiddens, num_outputs))
    b_q = torch.zeros(num_outputs, device=device)
    params = [W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def _book_inputs(device, dtype=torch.float32, seed=0):
    """What the book's RNNModelScratch passes: one-hot rows [T, B, V] of token ids."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (B, T), generator=gen)
    return F.one_hot(X.T, V).to(device=device, dtype=dtype)


def _random_params(device, dtype):
    """Parameters at a scale where every gate matters (the book's 0.01 init keeps all
    gates near 0.5 and the state near 0, which would hide a swapped gate), non-zero
    biases included."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(V, HID), (HID, HID), (HID,)] * 3 + [(HID, V), (V,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            .requires_grad_() for s in shapes]


# ------------------------------------------------------------------ init and signature

def test_get_params_matches_the_book():
    torch.manual_seed(0)
    expected = _book_get_params(V, HID, "cpu")
    torch.manual_seed(0)
    actual = scratch.get_params(V, HID, "cpu")
    assert len(actual) == len(expected) == 11
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert a.is_leaf and a.requires_grad
        assert torch.equal(a, e)
    # Consumes the random stream exactly as the book does: what follows is the same.
    torch.manual_seed(0)
    _book_get_params(V, HID, "cpu")
    after_book = torch.rand(4)
    torch.manual_seed(0)
    scratch.get_params(V, HID, "cpu")
    assert torch.equal(torch.rand(4), after_book)


def test_init_gru_state_matches_the_book():
    state = scratch.init_gru_state(B, HID, "cpu")
    assert isinstance(state, tuple) and len(state) == 1
    assert torch.equal(state[0], torch.zeros((B, HID)))


# ------------------------------------------------------- outputs and gradients vs book

def _check_matches_book(device, dtype, state_kind, params_kind):
    if params_kind == "random":
        params = _random_params(device, dtype)
    else:
        torch.manual_seed(0)
        params = [p.detach().to(dtype).requires_grad_()
                  for p in scratch.get_params(V, HID, device)]
    inputs = _book_inputs(device, dtype)
    if state_kind == "zeros":
        state = tuple(s.to(dtype) for s in scratch.init_gru_state(B, HID, device))
    else:
        state = (torch.randn(B, HID, device=device, dtype=dtype),)
    state = (state[0].requires_grad_(),)

    Y_ref, (H_ref,) = d2l_gru(inputs, state, params)
    Y, (H,) = scratch.gru(inputs, state, params)
    assert Y.shape == (T * B, V) and H.shape == (B, HID)
    torch.testing.assert_close(Y, Y_ref, **TOL[dtype])
    torch.testing.assert_close(H, H_ref, **TOL[dtype])

    gen = torch.Generator().manual_seed(2)
    w_Y = torch.randn(Y.shape, generator=gen, dtype=torch.float64).to(Y)
    w_H = torch.randn(H.shape, generator=gen, dtype=torch.float64).to(H)
    leaves = [state[0], *params]
    grads = torch.autograd.grad((Y * w_Y).sum() + (H * w_H).sum(), leaves)
    grads_ref = torch.autograd.grad((Y_ref * w_Y).sum() + (H_ref * w_H).sum(), leaves)
    names = ["H0", "W_xz", "W_hz", "b_z", "W_xr", "W_hr", "b_r", "W_xh", "W_hh", "b_h",
             "W_hq", "b_q"]
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("params_kind", ["book_init", "random"])
@pytest.mark.parametrize("state_kind", ["zeros", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_book_cpu(dtype, state_kind, params_kind):
    _check_matches_book("cpu", dtype, state_kind, params_kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_book_cuda(cuda_device, dtype):
    _check_matches_book(cuda_device, dtype, "random", "random")


def test_accepts_a_list_of_steps():
    params = _random_params("cpu", torch.float64)
    inputs = _book_inputs("cpu", torch.float64)
    state = (torch.zeros(B, HID, dtype=torch.float64),)
    Y, (H,) = scratch.gru(list(inputs), state, params)
    Y_ref, (H_ref,) = d2l_gru(inputs, state, params)
    torch.testing.assert_close(Y, Y_ref, **TOL[torch.float64])
    torch.testing.assert_close(H, H_ref, **TOL[torch.float64])


# ------------------------------------------------------------ the book's training loop

def test_book_training_loop_runs_unchanged():
    """A few steps of the book's train_epoch_ch8 pattern (state carried across batches
    and detached in place, grad clipping, sgd on the parameter list) give the same
    losses and parameters with scratch.gru as with the book's gru."""
    def train(gru_fn):
        torch.manual_seed(0)
        params = scratch.get_params(V, HID, "cpu")
        state, losses = None, []
        for step in range(3):
            gen = torch.Generator().manual_seed(10 + step)
            X = torch.randint(0, V, (B, T), generator=gen)
            Y = torch.randint(0, V, (B, T), generator=gen)
            if state is None:
                state = scratch.init_gru_state(B, HID, "cpu")
            else:
                for s in state:
                    s.detach_()  # must work: the state is a fresh tensor, not a view
            y_hat, state = gru_fn(F.one_hot(X.T, V).float(), state, params)
            loss = F.cross_entropy(y_hat, Y.T.reshape(-1))
            for p in params:
                p.grad = None
            loss.backward()
            norm = torch.sqrt(sum(torch.sum(p.grad ** 2) for p in params))
            with torch.no_grad():
                for p in params:
                    p.grad[:] *= min(1.0, 1.0 / norm.item())
                    p -= 1.0 * p.grad
            losses.append(loss.item())
        return losses, params

    losses_ref, params_ref = train(d2l_gru)
    losses, params = train(scratch.gru)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), **TOL[torch.float32])
    for p, p_ref in zip(params, params_ref):
        torch.testing.assert_close(p, p_ref, **TOL[torch.float32])


# ------------------------------------------------------------------ no loop over steps

def test_one_op_call_per_gru_call(monkeypatch):
    """All T steps go to the fused op in one call (no Python loop over time), with the
    book's formula (reset before the recurrent matmul)."""
    params = _random_params("cpu", torch.float32)
    calls = []
    original = scratch.ops.gru

    def spy(*args, **kwargs):
        calls.append((args[0].shape, kwargs.get("reset_after")))
        return original(*args, **kwargs)

    monkeypatch.setattr(scratch.ops, "gru", spy)
    scratch.gru(_book_inputs("cpu"), scratch.init_gru_state(B, HID, "cpu"), params)
    assert calls == [(torch.Size([T, B, V]), False)]


# ----------------------------------------------------------------------- bad input

def test_bad_inputs():
    params = _random_params("cpu", torch.float32)
    state = scratch.init_gru_state(B, HID, "cpu")
    inputs = _book_inputs("cpu")
    cases = [
        ((inputs, state, params[:10]), "params must be the 11 tensors of get_params"),
        ((inputs[0], state, params), "inputs must be [num_steps, batch_size, vocab_size]"),
        ((inputs[..., :-1], state, params),
         f"inputs have {V - 1} features per step but W_xz expects {V} (vocab_size)"),
        ((inputs, state[0], params), "state must be a 1-tuple (H,)"),
        ((inputs, (torch.zeros(B + 1, HID),), params),
         f"state H must be [batch_size, num_hiddens] = [{B}, {HID}], got shape [{B + 1}, {HID}]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            scratch.gru(*args)
