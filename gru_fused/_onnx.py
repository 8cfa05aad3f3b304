"""ONNX export of the fused GRU: one standard ONNX ``GRU`` node per layer and direction.

``gru_fused.ops.gru`` hands over to :func:`gru` below while ``torch.onnx.export(...,
dynamo=True)`` traces the model. The exporter cannot translate the compiled ops
(``torch.ops.gru_fused.*``), so instead of them the trace records
``torch.onnx.ops.symbolic_multi_out("GRU", ...)``, which the exporter writes out as the
ONNX operator itself, plus a few ordinary torch ops (slices, cat, where) that rearrange the
weights and reproduce gru_fused's handling of padded steps.

Mapping (ONNX ``GRU``, opset 14 and later, ``layout=0``):

- ``X [T, B, I]`` is the input as is.
- ``W [1, 3H, I]``, ``R [1, 3H, H]``, ``B [1, 6H]`` (``Wb`` then ``Rb``): ONNX stacks the
  gates (z, r, h) where nn.GRU stacks (r, z, n), so the first two blocks of rows swap.
- ``linear_before_reset``: 1 is ``reset_after=True`` (nn.GRU's
  ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``), 0 is ``reset_after=False``
  (``n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)``; ONNX's
  ``h_t = g(X_t W_h^T + (r_t . H_{t-1}) R_h^T + Rb_h + Wb_h)``).
- ``direction``: "forward", or "reverse" for ``reverse=True``.
- ``sequence_lens``: int32 ``lengths``, when given; ``initial_h [1, B, H]``: ``hx``, when
  given (ONNX's default is zeros, as gru_fused's).

Padded steps (``t >= lengths[b]``): ONNX writes zeros into ``Y`` there, while gru_fused
carries the state: forward, ``output[t, b]`` repeats the sequence's final state; reverse,
the padded steps come before the sequence's own last step, so they hold the initial
state. A ``Where`` on the mask ``t < lengths[b]`` restores that, and a second one makes
``h_n`` the initial state for a sequence of length 0 (whatever the runtime returns
there). Without ``lengths`` no mask is built.

Outside an export :func:`gru` returns placeholder zeros (that is what
``torch.onnx.ops.symbolic_multi_out`` computes eagerly): it is meant to be called only
while ``torch.onnx.export`` traces, on the traced (fake) tensors. Both export flags,
``torch.onnx.is_in_onnx_export()`` and ``torch.compiler.is_exporting()``, are
process-wide, so the caller also checks that ``input`` is a ``FakeTensor``: an eager call
in another thread during an export must not come here.

Limits: the exporter's fallback to ``torch.export(strict=True)`` (Dynamo) folds
``torch.onnx.is_in_onnx_export()`` to False, so only its default non-strict capture
takes this path; a ``PackedSequence`` input does not export (its checks depend on data).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _zrn(t: Tensor, H: int) -> Tensor:
    """nn.GRU's gate blocks (r, z, n) along dim 0, in ONNX's order (z, r, h)."""
    return torch.cat([t[H:2 * H], t[:H], t[2 * H:]], 0)


def gru(
    input: Tensor,
    hx: Optional[Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    *,
    reset_after: bool = True,
    reverse: bool = False,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """``gru_fused.ops.gru``'s contract, as one ONNX ``GRU`` node (export only).

    input [T, B, I], hx [B, H] or None, weight_ih [3H, I], weight_hh [3H, H], biases [3H]
    or None, lengths int64 [B] or None -> (output [T, B, H], h_n [B, H]).
    """
    T, B = input.shape[0], input.shape[1]
    H = weight_hh.shape[1]

    W = _zrn(weight_ih, H).unsqueeze(0)  # [1, 3H, I]
    R = _zrn(weight_hh, H).unsqueeze(0)  # [1, 3H, H]
    if bias_ih is None and bias_hh is None:
        bias = None  # ONNX's default: zeros
    else:
        b_i = bias_ih if bias_ih is not None else weight_ih.new_zeros(3 * H)
        b_h = bias_hh if bias_hh is not None else weight_hh.new_zeros(3 * H)
        bias = torch.cat([_zrn(b_i, H), _zrn(b_h, H)], 0).unsqueeze(0)  # [1, 6H]
    seq_lens = None if lengths is None else lengths.to(torch.int32)  # [B]
    initial_h = None if hx is None else hx.unsqueeze(0)  # [1, B, H]

    # A None between inputs is an empty (omitted) optional input of the node; trailing
    # Nones are dropped.
    Y, Y_h = torch.onnx.ops.symbolic_multi_out(
        "GRU",
        [input, W, R, bias, seq_lens, initial_h],
        dict(
            hidden_size=int(H),
            direction="reverse" if reverse else "forward",
            linear_before_reset=1 if reset_after else 0,
        ),
        dtypes=(input.dtype, input.dtype),
        shapes=([T, 1, B, H], [1, B, H]),
    )
    output = Y.squeeze(1)  # [T, B, H]
    h_n = Y_h.squeeze(0)  # [B, H]
    if lengths is None:
        return output, h_n

    # gru_fused's padded steps carry the state; ONNX's are zeros, and onnxruntime's
    # Y_h is zeros for a sequence of length 0 where gru_fused's h_n is hx.
    lens = lengths.to(device=input.device, dtype=torch.int64)
    h0 = hx if hx is not None else input.new_zeros((B, H))
    steps = torch.arange(T, device=input.device, dtype=torch.int64)
    active = (steps.unsqueeze(1) < lens.unsqueeze(0)).unsqueeze(2)  # [T, B, 1]
    h_n = torch.where((lens > 0).unsqueeze(1), h_n, h0)
    carried = h0 if reverse else h_n  # what a padded step holds
    output = torch.where(active, output, carried.unsqueeze(0))
    return output, h_n
