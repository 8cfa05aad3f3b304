"""Python side of the registered ops: fake (meta) kernels, autograd, and the functional API.

The ops themselves are declared once in csrc/ops.cpp (TORCH_LIBRARY(gru_fused, ...)); the
CPU and CUDA kernels are registrations of those schemas. Here they get

- fake kernels, so torch.compile / opcheck can trace them without running them;
- autograd: ``GRUFunction`` (backward through the ``gru_backward`` op, forward-mode AD,
  a vmap rule); the op's own registered autograd uses the same backward;
- ``gru()``: the documented, differentiable entry point used by FusedGRU and scratch; when
  no derivative can be taken it calls ``gru_inference``, which skips the saved workspace.
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
        ctx.has_bias, ctx.reset_after, ctx.reverse, *mask)
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
        # The mask comes as 6 flags, not a list: functorch's generated vmap rule cannot
        # flatten a list argument in forward-over-reverse.
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.gru_fused.gru_backward(*args[:12], list(args[12:]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx, *grads)

    @staticmethod
    def jvp(ctx, *tangents):  # forward-over-reverse (torch.func.hessian, jacfwd of grad)
        _no_double_backward(ctx, *tangents)


def _tangent(inputs, tangents, output, workspace, reset_after, reverse, lengths):
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
    - vmap: over inputs, states and lengths (the weights shared) the vmapped dimension
      joins the batch: one call of the op for all samples. Over weights, one call per
      sample.
    """

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
    def vmap(info, in_dims, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
             reset_after, reverse):
        n = info.batch_size
        dims = list(in_dims[:7])
        tensors = [input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths]
        if all(d is None for d in dims[2:6]):
            # The samples' sequences side by side in one batch: input [T, N*B, I].
            x = input.movedim(dims[0], 1) if dims[0] is not None else input.unsqueeze(1).expand(
                input.shape[0], n, *input.shape[1:])
            T, _, B = x.shape[:3]
            x = x.reshape(T, n * B, x.shape[3])
            h = hx.movedim(dims[1], 0) if dims[1] is not None else hx.expand(n, *hx.shape)
            h = h.reshape(n * B, h.shape[-1])
            lens = lengths
            if lengths is not None:
                lens = (lengths.movedim(dims[6], 0) if dims[6] is not None
                        else lengths.expand(n, B)).reshape(n * B)
            output, h_n, workspace = GRUFunction.apply(
                x, h, weight_ih, weight_hh, bias_ih, bias_hh, lens, reset_after, reverse)
            H = h_n.shape[-1]
            return ((output.view(T, n, B, H), h_n.view(n, B, H),
                     workspace.view(workspace.shape[0], T, n, B, H)), (1, 0, 2))
        # Batched weights: one call per sample.
        results = []
        for i in range(n):
            sample = [t if d is None or t is None else t.select(d, i)
                      for t, d in zip(tensors, dims)]
            results.append(GRUFunction.apply(*sample, reset_after, reverse))
        return tuple(torch.stack(r) for r in zip(*results)), (0, 0, 0)

    @staticmethod
    def jvp(ctx, t_input, t_hx, t_weight_ih, t_weight_hh, t_bias_ih, t_bias_hh, *_):
        x, hx, w_ih, w_hh, b_ih, b_hh, out, _, workspace = ctx.saved_tensors
        t_out, t_hn = _tangent((x, hx, w_ih, w_hh, b_ih, b_hh),
                               (t_input, t_hx, t_weight_ih, t_weight_hh, t_bias_ih, t_bias_hh),
                               out, workspace, ctx.reset_after, ctx.reverse, ctx.lengths)
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
    return _gru(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, reset_after, reverse,
                lengths)


def _autocast_dtype(input: Tensor, hx: Optional[Tensor]) -> Optional[torch.dtype]:
    """The dtype nn.GRU would compute in under torch.autocast on input's device, or None
    when autocast is off there.

    CUDA: cuDNN's autocast rule (ATen's AutocastRNN.cpp) casts input, hx and the weights to
    the autocast dtype. CPU: nn.GRU has no autocast rule of its own; its ops promote, so it
    computes in the input's dtype promoted with hx's (a bfloat16 input into a float32
    module gives bfloat16; a float32 input stays float32).
    """
    device = input.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    if device == "cuda":
        return torch.get_autocast_dtype("cuda")
    return input.dtype if hx is None else torch.promote_types(input.dtype, hx.dtype)


def _gru(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, reset_after, reverse, lengths,
         inference: bool = False):
    """gru() with one more switch: inference=True takes the inference op even where a
    gradient could be taken (an exported eval-mode FusedGRU)."""
    # torch.onnx.export(..., dynamo=True) traces with fake tensors: the layer becomes one
    # ONNX GRU node. The flags are process-wide, so the fake input tells the export's own
    # trace from a FusedGRU running eagerly in another thread meanwhile.
    if (torch.onnx.is_in_onnx_export() and torch.compiler.is_exporting()
            and isinstance(input, torch._subclasses.fake_tensor.FakeTensor)):
        from . import _onnx
        return _onnx.gru(input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                         reset_after=reset_after, reverse=reverse, lengths=lengths)
    dtype = _autocast_dtype(input, hx)
    if dtype is not None:
        def cast(t):
            return t if t is None or t.dtype == dtype else t.to(dtype)

        with torch.autocast(input.device.type, enabled=False):
            return _gru(cast(input), cast(hx), cast(weight_ih), cast(weight_hh),
                        cast(bias_ih), cast(bias_hh), reset_after, reverse, lengths, inference)
    if hx is None:
        hx = input.new_zeros((input.shape[1] if input.dim() == 3 else 0, weight_hh.shape[-1]))
    args = (input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reset_after, reverse)
    tensors = args[:6]
    grad = (not inference and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in tensors))
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # The op with its registered autograd (the same _backward): Dynamo cannot trace an
        # autograd.Function with a custom jvp, and a jit trace records ops, not Python
        # functions. A trace takes gru_forward whether or not grad is on, so that
        # torch.jit.trace's check (a second trace, under no_grad) finds the same graph.
        if not grad and not torch.jit.is_tracing():
            return torch.ops.gru_fused.gru_inference(*args)
        output, h_n, _ = torch.ops.gru_fused.gru_forward(*args)
        return output, h_n
    if not (grad or _forward_ad_active()):
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

    CUDA memory is not counted here: it goes through PyTorch's caching allocator
    (``torch.cuda.empty_cache()``). The CUDA backend keeps one small thing of its own:
    device copies of recently used ``lengths`` (at most 64 of B int64 each, plus those a
    captured CUDA graph reads, kept for the graph's sake), so that packed input needs no
    host synchronisation.
    """
    return int(_C.cached_bytes())


def empty_cache() -> int:
    """Releases the CPU memory counted by ``cached_bytes()``; returns the bytes released.

    A buffer still held by a live tensor (a workspace saved for a pending backward) is
    freed when that tensor dies. Later calls simply allocate again. Also drops the CUDA
    backend's device copies of ``lengths``, except those a captured CUDA graph reads.
    """
    return int(_C.empty_cache())


# The kernels a CUDA call runs (csrc/cuda/gru_persistent_plan.h decides; this reports).
_KERNELS = ("auto", "step", "persistent", "cluster", "cooperative")


def _device_properties(device: torch.device) -> dict:
    """What the CUDA backend's planner reads of ``device`` (the same attribute queries)."""
    if not getattr(_C, "CUDA_COMPILED", False):
        raise RuntimeError("gru_fused.cuda_kernel_plan: this build of gru_fused has no CUDA "
                           "kernels; pass device_properties to plan for a GPU")
    if device.type != "cuda":
        raise ValueError(f"gru_fused.cuda_kernel_plan: device must be a CUDA device, got {device}")
    index = torch.cuda.current_device() if device.index is None else device.index
    return _C.cuda_device_properties(index)


def cuda_kernel_plan(hidden_size: int, batch_size: int, dtype: torch.dtype = torch.float32,
                     reset_after: bool = True, device=None, kernel: Optional[str] = None,
                     device_properties: Optional[dict] = None) -> dict:
    """Which CUDA kernels a call with these sizes runs: ``{"forward": plan, "backward":
    plan}``, each plan a dict with

    - ``family``: ``"step"`` (one launch per step), ``"cluster"`` (one launch for the whole
      sequence; sm_90 thread-block clusters, W_hh in shared memory, the state exchanged
      through distributed shared memory) or ``"cooperative"`` (one cooperative launch,
      W_hh in shared memory over the SMs, a grid barrier per step);
    - ``cluster`` (CTAs per cluster; cooperative: CTAs of the grid), ``units`` (hidden
      units per CTA), ``rows`` (batch rows per cluster), ``clusters``, ``smem`` (bytes of
      shared memory per CTA): the persistent launch's geometry, zeros for step kernels;
    - ``why``: the reason, in words.

    ``kernel`` overrides the choice as the ``GRU_FUSED_CUDA_KERNEL`` environment variable
    does (``auto``, ``step``, ``persistent``, ``cluster``, ``cooperative``; default: that
    variable, else ``auto``, which runs the step kernels for now: see the README's
    "Persistent kernels"). The device is ``device`` (default: the current CUDA device),
    or, to plan for a GPU that is not here, ``device_properties``: a dict with ``cc``
    (major, minor), ``sm_count``, ``smem_per_block_optin`` (bytes), ``cooperative`` and
    ``clusters`` (bools), and optionally ``max_cluster`` (the widest cluster the planner
    may use, at most 16; default: 16 on compute capability 9.0 and 10.0, else 8). A
    persistent launch the device refuses at run time (its blocks cannot be co-resident)
    is planned again with clusters half as wide if it was a cluster plan, and otherwise
    runs on the step kernels; this reports the first plan.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"gru_fused.cuda_kernel_plan: dtype must be a floating-point "
                        f"torch.dtype, got {dtype!r}")
    for name, v in (("hidden_size", hidden_size), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"gru_fused.cuda_kernel_plan: {name} must be a positive int, "
                             f"got {v!r}")
    if kernel is not None and kernel not in _KERNELS:
        raise ValueError(f"gru_fused.cuda_kernel_plan: kernel must be one of {_KERNELS}, "
                         f"got {kernel!r}")
    if device_properties is None:
        if not torch.cuda.is_available():
            raise RuntimeError("gru_fused.cuda_kernel_plan: no CUDA device here; pass "
                               "device_properties to plan for one")
        device_properties = _device_properties(torch.device("cuda", torch.cuda.current_device())
                                               if device is None else torch.device(device))
    d = device_properties
    scalar = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4  # half and bfloat16 accumulate in float
    return {direction: _C.plan_cuda_kernel(
                direction, scalar, acc, hidden_size, batch_size, bool(reset_after), kernel,
                int(d["cc"][0]), int(d["cc"][1]), int(d["sm_count"]),
                int(d["smem_per_block_optin"]), bool(d["cooperative"]), bool(d["clusters"]),
                int(d.get("max_cluster", -1)))
            for direction in ("forward", "backward")}
