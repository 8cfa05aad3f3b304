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

try:
    from . import _C  # noqa: F401  (loading the extension registers torch.ops.gru_fused)
except ImportError as e:  # e.g. a source checkout without the built .so shadows the install
    import os as _os
    _pkg = _os.path.dirname(_os.path.abspath(__file__))
    _what = ("could not be loaded from" if any(f.startswith("_C.") for f in _os.listdir(_pkg))
             else "was not found in")
    raise ImportError(
        f"the compiled extension gru_fused._C {_what} {_pkg}: to build it, run "
        "`pip install --no-build-isolation -e .` in the checkout; or run from outside "
        "the checkout to use the installed package") from e

# Slots of the saved workspace [4, T, B, H]: the activations backward needs.
# slot 3 holds W_hn h + b_hn (reset_after=True) or r * h (reset_after=False).
WORKSPACE_SLOTS = 4


def cuda_compiled() -> bool:
    """True when the extension was built with the CUDA kernels."""
    return bool(_C.CUDA_COMPILED)


def _check_devices(input, named, lengths=None):
    """The real kernels' device rule, in the fake kernels too: every tensor on input's
    device, lengths on the CPU. Without it a tensor on the meta device beside CPU
    tensors would send the call to these fake kernels, which would return
    uninitialised CPU memory instead of an error."""
    for name, t in named:
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"gru_fused: {name} is on {t.device} but input is on {input.device}; all "
                "tensors must be on one device")
    if lengths is not None and lengths.device.type != "cpu":
        raise RuntimeError(
            "gru_fused: lengths must be a CPU tensor (as torch.nn.utils.rnn requires), got "
            f"one on {lengths.device}")


@torch.library.register_fake("gru_fused::gru_forward")
def _gru_forward_fake(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                      reset_after, reverse):
    _check_devices(input, [("hx", hx), ("weight_ih", weight_ih), ("weight_hh", weight_hh),
                           ("bias_ih", bias_ih), ("bias_hh", bias_hh)], lengths)
    T, B, _ = input.shape
    H = weight_hh.shape[1]
    output = input.new_empty((T, B, H))
    h_n = input.new_empty((B, H))
    workspace = input.new_empty((WORKSPACE_SLOTS, T, B, H))
    return output, h_n, workspace


@torch.library.register_fake("gru_fused::gru_inference")
def _gru_inference_fake(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                        reset_after, reverse):
    output, h_n, _ = _gru_forward_fake(input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                       lengths, reset_after, reverse)
    return output, h_n


@torch.library.register_fake("gru_fused::gru_backward")
def _gru_backward_fake(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output,
                       workspace, lengths, has_bias, reset_after, reverse, output_mask):
    _check_devices(input, [("grad_output", grad_output), ("grad_h_n", grad_h_n),
                           ("hx", hx), ("weight_ih", weight_ih), ("weight_hh", weight_hh),
                           ("output", output), ("workspace", workspace)], lengths)

    # The real kernels return fresh contiguous gradients whatever the inputs' strides.
    def like(t, needed):
        return t.new_empty(t.shape if needed else (0,))

    G = weight_ih.shape[0]
    bias_like = weight_ih.new_empty((G,))
    return (like(input, output_mask[0]), like(hx, output_mask[1]),
            like(weight_ih, output_mask[2]), like(weight_hh, output_mask[3]),
            like(bias_like, output_mask[4] and has_bias),
            like(bias_like, output_mask[5] and has_bias))


def _save(ctx, inputs, output):
    """What the backward and the tangent (jvp) read; shared by GRUFunction and the op's
    registered autograd."""
    input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reset_after, reverse = inputs
    out, _, workspace = output
    ctx.save_for_backward(input, hx, weight_ih, weight_hh, out, workspace)
    ctx.lengths = lengths
    ctx.has_bias = bias_ih is not None
    ctx.reset_after = reset_after
    ctx.reverse = reverse
    ctx.mark_non_differentiable(workspace)
    # Unused outputs get None, not zeros: materialising them would fill a workspace-sized
    # tensor every backward. _backward substitutes zeros only where the op needs them.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output, grad_h_n, _grad_workspace):
    """The vector-Jacobian product: one gru_backward call. The only backward there is."""
    input, hx, weight_ih, weight_hh, out, workspace = ctx.saved_tensors
    if grad_output is None:
        grad_output = torch.zeros_like(out)
    if grad_h_n is None:
        grad_h_n = torch.zeros_like(hx)
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], needs[2], needs[3],
            ctx.has_bias and needs[4], ctx.has_bias and needs[5]]
    grads = _GRUBackward.apply(
        grad_output, grad_h_n, input, hx, weight_ih, weight_hh, out, workspace, ctx.lengths,
        ctx.has_bias, ctx.reset_after, ctx.reverse, mask)
    grads = [g if m else None for g, m in zip(grads, mask)]
    return (*grads, None, None, None)


torch.library.register_autograd("gru_fused::gru_forward", _backward, setup_context=_save)


def _no_double_backward(ctx, *grads):
    # Without this registration autograd would treat gru_backward's outputs as constants
    # and a second derivative would come out silently zero.
    raise RuntimeError(
        "gru_fused: second derivatives are not supported: the gradients of a FusedGRU "
        "(or gru_fused.gru) taken with create_graph=True cannot be differentiated again. "
        "Use torch.nn.GRU for double backward (e.g. gradient penalties).")


torch.library.register_autograd("gru_fused::gru_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


class _GRUBackward(torch.autograd.Function):
    """gru_backward as the backward of GRUFunction calls it: a derivative of its own that
    raises (as the op's registration above), in the setup_context form that functorch
    transforms (grad of vmap, vmap of grad) accept."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.gru_fused.gru_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx, *grads)


def _tangent(inputs, tangents, output, h_n, workspace, reset_after, reverse, lengths):
    """The Jacobian-vector product of one layer: the tangents of (output, h_n).

    The tangent of the state is a linear recurrence driven by the saved gates:
        dh' = (1 - z) dn + dz (h - n) + z dh
    with dr = r (1 - r) (dgi_r + dgh_r), dz likewise, and
        dn = (1 - n^2) (dgi_n + dr (W_hn h + b_hn) + r dgh_n)    reset_after
        dn = (1 - n^2) (dgi_n + dgh_n), gh_n = W_hn (r h) + b_hn   reset_before
    Every term that does not depend on the previous step's dh is one GEMM over all
    steps; the loop keeps only the recurrent products. Padded steps carry dh.
    """
    x, hx, w_ih, w_hh, b_ih, b_hh = inputs
    tx, thx, tw_ih, tw_hh, tb_ih, tb_hh = tangents
    T, B, _ = x.shape
    H = w_hh.shape[1]
    r, z, n, slot = workspace.unbind(0)  # [T, B, H] each; slot: W_hn h + b_hn, or r h
    steps = range(T - 1, -1, -1) if reverse else range(T)
    # h_prev [T, B, H]: the state each step starts from.
    if reverse:
        h_prev = torch.cat([output[1:], hx.unsqueeze(0)], 0)
    else:
        h_prev = torch.cat([hx.unsqueeze(0), output[:-1]], 0)

    def add(a, b):
        return b if a is None else (a if b is None else a + b)

    zero = x.new_zeros((T, B, 3 * H))
    # d(x W_ih^T + b_ih)
    tgi = zero
    if tx is not None:
        tgi = tgi + tx @ w_ih.t()
    if tw_ih is not None:
        tgi = tgi + x @ tw_ih.t()
    if tb_ih is not None:
        tgi = tgi + tb_ih
    # The part of d(gh) that does not go through the previous state's tangent:
    # dW_hh h (dW_hn (r h) for the reset-before candidate) + db_hh.
    tgh = zero
    if tw_hh is not None:
        tgh = tgh + h_prev @ tw_hh.t()
        if not reset_after:
            tgh[..., 2 * H:] = slot @ tw_hh[2 * H:].t()
    if tb_hh is not None:
        tgh = tgh + tb_hh
    tgi_r, tgi_z, tgi_n = tgi.split(H, dim=2)
    tgh_r, tgh_z, tgh_n = tgh.split(H, dim=2)
    w_hr_z, w_hn = w_hh[:2 * H], w_hh[2 * H:]
    active = None
    if lengths is not None:
        active = (torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)
        active = active.to(x.device)  # [T, B, 1]

    th = thx if thx is not None else hx.new_zeros((B, H))
    t_out = [None] * T
    for t in steps:
        rt, zt, nt, hp = r[t], z[t], n[t], h_prev[t]
        rec = th @ (w_hh if reset_after else w_hr_z).t()  # W_h* dh  [B, 3H] or [B, 2H]
        rec_r, rec_z = rec[:, :H], rec[:, H:2 * H]
        dr = rt * (1 - rt) * (tgi_r[t] + tgh_r[t] + rec_r)
        dz = zt * (1 - zt) * (tgi_z[t] + tgh_z[t] + rec_z)
        if reset_after:
            dgh_n = tgh_n[t] + rec[:, 2 * H:]
            dn = (1 - nt * nt) * (tgi_n[t] + dr * slot[t] + rt * dgh_n)
        else:
            dgh_n = tgh_n[t] + (dr * hp + rt * th) @ w_hn.t()
            dn = (1 - nt * nt) * (tgi_n[t] + dgh_n)
        th_new = (1 - zt) * dn + dz * (hp - nt) + zt * th
        th = th_new if active is None else torch.where(active[t], th_new, th)
        t_out[t] = th
    return torch.stack(t_out), th.clone()


class GRUFunction(torch.autograd.Function):
    """The fused GRU layer as a ``torch.autograd.Function``: one layer, one direction.

    ``GRUFunction.apply(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
    reset_after, reverse) -> (output [T, B, H], h_n [B, H], workspace)``, arguments as
    ``gru_fused.gru`` (hx is required here). The workspace is what the backward reads;
    it is not differentiable.

    - backward: the ``gru_backward`` op (the same function the op's registered autograd
      uses; there is one backward);
    - jvp: forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``), the
      tangent recurrence of ``_tangent`` on the saved gates;
    - second derivatives raise a RuntimeError (``gru_backward`` has no derivative).
    - vmap: the rule is generated from forward, backward and jvp, which vmap the ops
      (PyTorch's per-sample fallback for custom ops).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reset_after,
                reverse):
        # Below autograd: this Function is the op's derivative here, not the op's own
        # registered autograd (which functorch transforms such as vmap would refuse).
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.gru_fused.gru_forward(input, hx, weight_ih, weight_hh, bias_ih,
                                                   bias_hh, lengths, reset_after, reverse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs, output)
        input, hx, weight_ih, weight_hh, bias_ih, bias_hh = inputs[:6]
        ctx.save_for_forward(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, *output)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_workspace):
        return _backward(ctx, grad_output, grad_h_n, grad_workspace)

    @staticmethod
    def jvp(ctx, t_input, t_hx, t_weight_ih, t_weight_hh, t_bias_ih, t_bias_hh, *_):
        x, hx, w_ih, w_hh, b_ih, b_hh, out, h_n, workspace = ctx.saved_tensors
        t_out, t_hn = _tangent((x, hx, w_ih, w_hh, b_ih, b_hh),
                               (t_input, t_hx, t_weight_ih, t_weight_hh, t_bias_ih, t_bias_hh),
                               out, h_n, workspace, ctx.reset_after, ctx.reverse, ctx.lengths)
        return t_out, t_hn, None


def _forward_ad_active() -> bool:
    """Whether forward-mode AD may be tracking the call (a dual level or a functorch
    transform such as torch.func.jvp is active)."""
    from torch.autograd import forward_ad
    return (getattr(forward_ad, "_current_level", -1) >= 0
            or torch._C._functorch.maybe_current_level() is not None)


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
    args = (input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reset_after, reverse)
    tensors = args[:6]
    if torch.compiler.is_compiling():
        # Dynamo cannot trace an autograd.Function with a custom jvp: the op and its
        # registered autograd (the same _backward) go into the graph instead.
        grad = any(t is not None and t.requires_grad for t in tensors)
        if not (torch.is_grad_enabled() and grad):
            return torch.ops.gru_fused.gru_inference(*args)
        output, h_n, _ = torch.ops.gru_fused.gru_forward(*args)
        return output, h_n
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
            or _forward_ad_active()):
        # No derivative will be taken: skip the workspace the backward would need.
        return torch.ops.gru_fused.gru_inference(*args)
    output, h_n, _ = GRUFunction.apply(*args)
    return output, h_n


def cached_bytes() -> int:
    """Bytes of CPU memory the ops keep between calls to avoid re-faulting big buffers.

    Two caches, both bounded:

    - scratch buffers: per thread that has called an op, one buffer per role (4 roles),
      each at most 32 MiB, so at most 128 MiB per such thread (freed when the thread
      exits);
    - the workspace pool: at most 2 freed workspaces of 32 MiB or more (the saved
      [4, T, B, H] activations), each the size of one recently freed.

    CUDA memory is not kept here: it goes through PyTorch's caching allocator
    (``torch.cuda.empty_cache()``).
    """
    return int(_C.cached_bytes())


def empty_cache() -> int:
    """Releases the CPU memory counted by ``cached_bytes()``; returns the bytes released.

    A buffer still held by a live tensor (a workspace saved for a pending backward) is
    freed when that tensor dies. Later calls simply allocate again.
    """
    return int(_C.empty_cache())
