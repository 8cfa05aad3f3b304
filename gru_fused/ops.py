"""Python side of the registered ops: fake (meta) kernels, autograd, and the functional API.

The ops themselves are declared once in csrc/ops.cpp (TORCH_LIBRARY(gru_fused, ...)); the
CPU and CUDA kernels are registrations of those schemas. Here they get

- fake kernels, so torch.compile / opcheck can trace them without running them;
- autograd: the backward of ``gru_forward`` calls the ``gru_backward`` op;
- ``gru()``: the documented, differentiable entry point used by FusedGRU and scratch; when
  no gradient can be taken it calls ``gru_inference``, which skips the saved workspace.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the extension registers torch.ops.gru_fused)

# Slots of the saved workspace [4, T, B, H]: the activations backward needs.
# slot 3 holds W_hn h + b_hn (reset_after=True) or r * h (reset_after=False).
WORKSPACE_SLOTS = 4


def cuda_compiled() -> bool:
    """True when the extension was built with the CUDA kernels."""
    return bool(_C.CUDA_COMPILED)


@torch.library.register_fake("gru_fused::gru_forward")
def _gru_forward_fake(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                      reset_after, reverse):
    T, B, _ = input.shape
    H = weight_hh.shape[1]
    output = input.new_empty((T, B, H))
    h_n = input.new_empty((B, H))
    workspace = input.new_empty((WORKSPACE_SLOTS, T, B, H))
    return output, h_n, workspace


@torch.library.register_fake("gru_fused::gru_inference")
def _gru_inference_fake(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                        reset_after, reverse):
    T, B, _ = input.shape
    H = weight_hh.shape[1]
    return input.new_empty((T, B, H)), input.new_empty((B, H))


@torch.library.register_fake("gru_fused::gru_backward")
def _gru_backward_fake(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output,
                       workspace, has_bias, reset_after, reverse, output_mask):
    def like(t, needed):
        return torch.empty_like(t) if needed else t.new_empty((0,))

    G = weight_ih.shape[0]
    bias_like = weight_ih.new_empty((G,))
    return (like(input, output_mask[0]), like(hx, output_mask[1]),
            like(weight_ih, output_mask[2]), like(weight_hh, output_mask[3]),
            like(bias_like, output_mask[4] and has_bias),
            like(bias_like, output_mask[5] and has_bias))


def _setup_context(ctx, inputs, output):
    input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reset_after, reverse = inputs
    out, _, workspace = output
    ctx.save_for_backward(input, hx, weight_ih, weight_hh, out, workspace)
    ctx.has_bias = bias_ih is not None
    ctx.reset_after = reset_after
    ctx.reverse = reverse
    ctx.mark_non_differentiable(workspace)
    # Unused outputs get None, not zeros: materialising them would fill a workspace-sized
    # tensor every backward. _backward substitutes zeros only where the op needs them.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output, grad_h_n, _grad_workspace):
    input, hx, weight_ih, weight_hh, out, workspace = ctx.saved_tensors
    if grad_output is None:
        grad_output = torch.zeros_like(out)
    if grad_h_n is None:
        grad_h_n = torch.zeros_like(hx)
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], needs[2], needs[3],
            ctx.has_bias and needs[4], ctx.has_bias and needs[5]]
    grads = torch.ops.gru_fused.gru_backward(
        grad_output.contiguous(), grad_h_n.contiguous(), input, hx, weight_ih, weight_hh,
        out, workspace, ctx.has_bias, ctx.reset_after, ctx.reverse, mask)
    grads = [g if m else None for g, m in zip(grads, mask)]
    return (*grads, None, None, None)


torch.library.register_autograd("gru_fused::gru_forward", _backward,
                                setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    # Without this registration autograd would treat gru_backward's outputs as constants
    # and a second derivative would come out silently zero.
    raise RuntimeError(
        "gru_fused: second derivatives are not supported: the gradients of a FusedGRU "
        "(or gru_fused.gru) taken with create_graph=True cannot be differentiated again. "
        "Use torch.nn.GRU for double backward (e.g. gradient penalties).")


torch.library.register_autograd("gru_fused::gru_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


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
    """One GRU layer, one direction, fused. Differentiable in every tensor argument.

    Args:
        input: [T, B, I] floating point.
        hx: [B, H] initial state, or None for zeros.
        weight_ih: [3H, I], weight_hh: [3H, H], gates stacked (r, z, n) as in nn.GRU.
        bias_ih, bias_hh: [3H] each, both or neither.
        reset_after: True is nn.GRU/cuDNN's n = tanh(W_in x + b_in + r * (W_hn h + b_hn));
            False is the original n = tanh(W_in x + b_in + W_hn (r * h) + b_hn).
        reverse: run the steps from T-1 down to 0 (the backward direction of a
            bidirectional layer); output[t] is still the state after input[t].
        lengths: optional int64 [B]: sequence b is active at steps t < lengths[b]. At
            other steps its state is carried unchanged (output[t, b] repeats it), so
            h_n is each sequence's state after its own last step, and with reverse=True
            each sequence starts at its own last step.

    Returns:
        (output [T, B, H], h_n [B, H]); h_n is a fresh tensor, never a view of output.
    """
    if hx is None:
        hx = input.new_zeros((input.shape[1] if input.dim() == 3 else 0, weight_hh.shape[-1]))
    tensors = (input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # No gradient will be taken: skip the workspace the backward would need.
        return torch.ops.gru_fused.gru_inference(
            input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reset_after, reverse)
    output, h_n, _ = torch.ops.gru_fused.gru_forward(
        input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reset_after, reverse)
    return output, h_n
