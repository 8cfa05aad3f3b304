"""Pure-PyTorch GRU references: the ground truth the fused kernels are tested against.

Shapes: T steps, B batch, I input features, H hidden units. Weights use nn.GRU's layout,
gates stacked in the order (r, z, n):

    weight_ih [3H, I], weight_hh [3H, H], bias_ih [3H], bias_hh [3H]

Both formulas share r, z and the update; they differ only in where the reset gate acts:

    r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    reset_after=True  (nn.GRU, cuDNN):     n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    reset_after=False (Cho et al., d2l):   n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)
    h' = (1 - z) * n + z * h
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def gru_cell(
    x: Tensor,
    h: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    reset_after: bool = True,
) -> Tensor:
    """One step: x [B, I], h [B, H] -> h' [B, H]."""
    gi = torch.nn.functional.linear(x, weight_ih, bias_ih)  # [B, 3H]
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    w_hr, w_hz, w_hn = weight_hh.chunk(3, dim=0)
    b_hr, b_hz, b_hn = (None, None, None) if bias_hh is None else bias_hh.chunk(3)
    r = torch.sigmoid(i_r + torch.nn.functional.linear(h, w_hr, b_hr))
    z = torch.sigmoid(i_z + torch.nn.functional.linear(h, w_hz, b_hz))
    if reset_after:
        n = torch.tanh(i_n + r * torch.nn.functional.linear(h, w_hn, b_hn))
    else:
        n = torch.tanh(i_n + torch.nn.functional.linear(r * h, w_hn, b_hn))
    return (1 - z) * n + z * h


def gru_layer(
    input: Tensor,
    hx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    reset_after: bool = True,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One layer, one direction: input [T, B, I], hx [B, H] -> (output [T, B, H], h_n [B, H]).

    With reverse=True the steps run from T-1 down to 0; output[t] is still the state
    after consuming input[t], as in a bidirectional nn.GRU's backward direction.
    """
    steps = range(input.shape[0] - 1, -1, -1) if reverse else range(input.shape[0])
    h = hx
    outputs = [None] * input.shape[0]
    for t in steps:
        h = gru_cell(input[t], h, weight_ih, weight_hh, bias_ih, bias_hh, reset_after)
        outputs[t] = h
    return torch.stack(outputs), h


# --- The "Dive into Deep Learning" from-scratch GRU (section "Gated Recurrent Units") ---
# params = [W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q]
# with W_x* [I, H], W_h* [H, H], b_* [H], W_hq [H, Q], b_q [Q]; inputs is a sequence of
# [B, I] tensors and the state a 1-tuple (H,).

def d2l_gru(inputs: Sequence[Tensor], state: Tuple[Tensor], params: Sequence[Tensor]):
    """The book's Python loop, verbatim in formula:

        Z = sigmoid(X W_xz + H W_hz + b_z)
        R = sigmoid(X W_xr + H W_hr + b_r)
        H~ = tanh(X W_xh + (R * H) W_hh + b_h)
        H = Z * H + (1 - Z) * H~
        Y = H W_hq + b_q

    Returns (cat(Y over steps) [T*B, Q], (H,)).
    """
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q = params
    (H,) = state
    outputs = []
    for X in inputs:
        Z = torch.sigmoid((X @ W_xz) + (H @ W_hz) + b_z)
        R = torch.sigmoid((X @ W_xr) + (H @ W_hr) + b_r)
        H_tilda = torch.tanh((X @ W_xh) + ((R * H) @ W_hh) + b_h)
        H = Z * H + (1 - Z) * H_tilda
        Y = H @ W_hq + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H,)


def d2l_params_to_layer(params: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """The book's gate weights in nn.GRU layout: (weight_ih [3H, I], weight_hh [3H, H], bias [3H]).

    The book has one bias per gate; it maps to bias_ih with bias_hh = 0, which is exact
    for both formulas (b_hn is added outside the reset in the reset-before formula).
    """
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h = params[:9]
    weight_ih = torch.cat([W_xr.t(), W_xz.t(), W_xh.t()], dim=0)
    weight_hh = torch.cat([W_hr.t(), W_hz.t(), W_hh.t()], dim=0)
    bias = torch.cat([b_r, b_z, b_h])
    return weight_ih, weight_hh, bias
