"""Drop-in for the "Dive into Deep Learning" from-scratch GRU (section "Gated Recurrent
Units"), running on the fused op.

Replace the book's ``get_params``, ``init_gru_state`` and ``gru`` with these (for
example ``d2l.RNNModelScratch(len(vocab), num_hiddens, device, get_params,
init_gru_state, gru)``) and nothing else changes: same signatures, same parameter list,
layout and initialisation (the same seed draws the same weights), same return values.

Shapes: T steps, B batch, V vocabulary size (= inputs = outputs), H hidden units.
The book's parameters, in its order and layout:

    W_xz [V, H], W_hz [H, H], b_z [H]     update gate
    W_xr [V, H], W_hr [H, H], b_r [H]     reset gate
    W_xh [V, H], W_hh [H, H], b_h [H]     candidate state
    W_hq [H, V], b_q [V]                  output layer

The book's candidate is H~ = tanh(X W_xh + (R * H) W_hh + b_h): the reset acts before
the recurrent matmul, i.e. the op's reset_after=False.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import ops

NUM_PARAMS = 11  # W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q


def get_params(vocab_size: int, num_hiddens: int, device) -> List[Tensor]:
    """The book's parameters, drawn in the book's order (same seed, same weights)."""
    num_inputs = num_outputs = vocab_size

    def normal(shape):
        return torch.randn(size=shape, device=device) * 0.01

    def three():
        return (normal((num_inputs, num_hiddens)),
                normal((num_hiddens, num_hiddens)),
                torch.zeros(num_hiddens, device=device))

    W_xz, W_hz, b_z = three()  # update gate
    W_xr, W_hr, b_r = three()  # reset gate
    W_xh, W_hh, b_h = three()  # candidate hidden state
    W_hq = normal((num_hiddens, num_outputs))
    b_q = torch.zeros(num_outputs, device=device)
    params = [W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_gru_state(batch_size: int, num_hiddens: int, device) -> Tuple[Tensor]:
    """The book's initial state: a 1-tuple holding zeros [B, H]."""
    return (torch.zeros((batch_size, num_hiddens), device=device),)


def gru(
    inputs: Union[Tensor, Sequence[Tensor]],
    state: Tuple[Tensor],
    params: Sequence[Tensor],
) -> Tuple[Tensor, Tuple[Tensor]]:
    """The book's ``gru``, fused: all T steps in one op call instead of a Python loop.

    Args:
        inputs: [T, B, V] (the book passes one-hot rows, F.one_hot(X.T, V).float()), or
            a sequence of T tensors [B, V].
        state: (H,) with H [B, H].
        params: the 11 tensors of ``get_params``.

    Returns:
        (Y [T*B, V], (H_T,)): the output layer at every step, concatenated over time as
        the book's ``torch.cat(outputs, dim=0)``, and the state after the last step (a
        fresh tensor, so the book's ``s.detach_()`` works).
    """
    if len(params) != NUM_PARAMS:
        raise ValueError(
            f"gru: params must be the {NUM_PARAMS} tensors of get_params (W_xz, W_hz, b_z, "
            f"W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q), got {len(params)}")
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q = params
    if not isinstance(state, (tuple, list)) or len(state) != 1:
        raise ValueError("gru: state must be a 1-tuple (H,) as init_gru_state returns, got "
                         f"{type(state).__name__}"
                         + (f" of length {len(state)}" if isinstance(state, (tuple, list))
                            else ""))
    (H,) = state
    X = inputs if isinstance(inputs, Tensor) else torch.stack(list(inputs))
    if X.dim() != 3:
        raise ValueError(
            f"gru: inputs must be [num_steps, batch_size, vocab_size] (or a sequence of "
            f"[batch_size, vocab_size] tensors), got shape {list(X.shape)}")
    if X.size(2) != W_xz.size(0):
        raise ValueError(f"gru: inputs have {X.size(2)} features per step but W_xz expects "
                         f"{W_xz.size(0)} (vocab_size)")
    if H.dim() != 2 or H.size(0) != X.size(1) or H.size(1) != W_hz.size(0):
        raise ValueError(
            f"gru: state H must be [batch_size, num_hiddens] = "
            f"[{X.size(1)}, {W_hz.size(0)}], got shape {list(H.shape)}")

    # The book's right-multiplied [in, out] matrices become nn.GRU's [3H, in] layout,
    # gates in the op's order (r, z, n). This is one copy of the gate weights per call,
    # not per step. Caching it would save that copy only when the weights have not
    # changed since the last call, and a cached tensor would have to be invalidated on
    # every in-place optimizer step and would pin one call's autograd graph into the
    # next; next to the T*B-row GEMMs of a call the copy is small, so it is not cached.
    weight_ih = torch.cat([W_xr.t(), W_xz.t(), W_xh.t()], dim=0)  # [3H, V]
    weight_hh = torch.cat([W_hr.t(), W_hz.t(), W_hh.t()], dim=0)  # [3H, H]
    # The book has one bias per gate. With the reset before the matmul every bias sits
    # outside it, so all of them go in bias_ih and bias_hh is zero (the op takes both
    # or neither).
    bias_ih = torch.cat([b_r, b_z, b_h])  # [3H]
    bias_hh = torch.zeros_like(bias_ih)  # no grad wanted, so the op computes none
    outputs, H = ops.gru(X, H, weight_ih, weight_hh, bias_ih, bias_hh,
                         reset_after=False)  # outputs [T, B, H]
    # One GEMM for every step's output layer; rows are step-major, as the book's cat.
    Y = torch.addmm(b_q, outputs.reshape(-1, outputs.size(2)), W_hq)  # [T*B, V]
    return Y, (H,)
