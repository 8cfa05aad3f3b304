"""FusedGRU: a drop-in replacement for torch.nn.GRU that runs on the fused gru_fused op.

Shapes: T steps, B batch, I input features, H hidden units, L layers, D directions
(2 when bidirectional, else 1).

FusedGRU derives from ``nn.RNNBase`` in mode "GRU" rather than from ``nn.GRU``:

- RNNBase gives nn.GRU's constructor checks, parameter names, registration order and
  initialisation (the same seed draws the same weights), ``extra_repr``, ``all_weights``
  and pickling, so state_dicts move both ways unchanged.
- Not being an ``nn.GRU`` keeps ``torch.compile`` tracing through it: Dynamo refuses to
  trace ``nn.RNN``/``nn.GRU``/``nn.LSTM`` instances (``torch._dynamo.config.allow_rnn``)
  because their forward is an opaque ``_VF`` call; ours is a few registered ops.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import ops


class FusedGRU(nn.RNNBase):
    """Multi-layer GRU with nn.GRU's interface, running each layer and direction as one
    fused op (``gru_fused.gru``).

    Args are nn.GRU's (``input_size, hidden_size, num_layers, bias, batch_first, dropout,
    bidirectional, device, dtype``), plus:

        reset_after: True (default) is nn.GRU's formula,
            n = tanh(W_in x + b_in + r * (W_hn h + b_hn));
            False applies the reset before the recurrent matmul, as the original paper,
            d2l and Keras ``reset_after=False`` do: n = tanh(W_in x + b_in + W_hn (r * h) + b_hn).
            Parameters and state_dict are identical either way; only the formula differs.

    Forward: ``(input, hx=None) -> (output, h_n)`` exactly as nn.GRU:

        input: [T, B, I], or [B, T, I] with batch_first, or unbatched [T, I], or a
            PackedSequence of variable-length sequences.
        hx:    [L * D, B, H] ([L * D, H] for unbatched input); zeros when None.
        output: [T, B, D * H] (batch_first: [B, T, D * H]; unbatched: [T, D * H]; a
            PackedSequence for packed input).
        h_n:   [L * D, B, H] ([L * D, H] unbatched), each sequence's state after its own
            last step; always a fresh tensor, so ``h_n.detach_()`` works.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        reset_after: bool = True,
    ) -> None:
        if not isinstance(reset_after, bool):
            raise TypeError(
                f"reset_after should be of type bool, got: {type(reset_after).__name__}")
        # proj_size = 0: nn.GRU has no projections.
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype)
        self.reset_after = reset_after

    def flatten_parameters(self) -> None:
        """No-op, kept so code written for nn.GRU runs unchanged.

        nn.GRU packs its weights into one buffer for cuDNN; the fused op reads each
        layer's weights where they are, so there is nothing to flatten.
        """

    def extra_repr(self) -> str:
        s = super().extra_repr()
        # Only the non-default is shown, so a default FusedGRU prints like nn.GRU.
        if not self.reset_after:
            s += ", reset_after=False"
        return s

    def __setstate__(self, d):
        super().__setstate__(d)
        # Modules pickled before reset_after existed used nn.GRU's formula.
        if "reset_after" not in d:
            self.reset_after = True

    def forward(
        self, input: Union[Tensor, PackedSequence], hx: Optional[Tensor] = None
    ) -> Tuple[Union[Tensor, PackedSequence], Tensor]:
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)

        if input.dim() not in (2, 3):
            raise ValueError(
                f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            # As nn.GRU: an unbatched [T, I] input is a batch of one (batch_first is moot).
            input = input.unsqueeze(batch_dim)
            if hx is not None:
                if hx.dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx should also be 2-D but got "
                        f"{hx.dim()}-D tensor")
                hx = hx.unsqueeze(1)
        elif hx is not None and hx.dim() != 3:
            raise RuntimeError(
                f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")

        x = input.transpose(0, 1) if self.batch_first else input  # [T, B, I]
        self._check_forward_args(x, hx, batch=x.size(1))
        output, finals = self._run_layers(x, hx, lengths=None)  # [T, B, D*H]
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            # Each final state is [1, H]: cat gives [L*D, H] as a fresh tensor, where
            # nn.GRU's squeeze returns a view that h_n.detach_() would reject.
            return output.squeeze(batch_dim), torch.cat(finals, 0)
        return output, torch.stack(finals, 0)  # h_n [L*D, B, H]

    def _forward_packed(
        self, packed: PackedSequence, hx: Optional[Tensor]
    ) -> Tuple[PackedSequence, Tensor]:
        data, batch_sizes, sorted_indices, unsorted_indices = packed  # data [N, I]
        if data.dim() != 2:
            raise RuntimeError(f"input must have 2 dimensions, got {data.dim()}")
        if batch_sizes.dim() != 1 or batch_sizes.numel() == 0:
            raise RuntimeError(
                "PackedSequence batch_sizes must be a non-empty 1-D tensor, got shape "
                f"{list(batch_sizes.shape)}")
        # The packed layout requires the sequences sorted by decreasing length, i.e.
        # non-increasing batch_sizes; a hand-built PackedSequence may violate it.
        if bool((batch_sizes[1:] > batch_sizes[:-1]).any()):
            raise RuntimeError(
                "PackedSequence batch_sizes must be non-increasing (sequences sorted by "
                f"decreasing length), got {batch_sizes.tolist()}; build it with "
                "torch.nn.utils.rnn.pack_padded_sequence or pack_sequence")
        if int(batch_sizes.sum()) != data.size(0):
            raise RuntimeError(
                f"PackedSequence data has {data.size(0)} rows but its batch_sizes sum to "
                f"{int(batch_sizes.sum())}")
        T, B = batch_sizes.numel(), int(batch_sizes[0])
        if hx is not None:
            # hx is in the user's order; the packed sequences are sorted by length.
            hx = self.permute_hidden(hx, sorted_indices)
        self._check_forward_args(data, hx, batch=B)

        # Packed <-> padded [T, B, .] with the ops torch.nn.utils.rnn uses: slices copied
        # on the device, one per run of equal batch sizes, driven by batch_sizes on the
        # host. No index tensor goes to the GPU (a blocking copy: a host synchronisation
        # every call, and illegal inside CUDA graph capture).
        x, lengths = torch._pad_packed_sequence(data, batch_sizes, False, 0.0, T)  # [B] CPU
        output, finals = self._run_layers(x, hx, lengths=lengths)
        out_data, _ = torch._pack_padded_sequence(output, lengths, False)  # [N, D*H]
        h_n = torch.stack(finals, 0)  # [L*D, B, H], sorted order
        return (PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices),
                self.permute_hidden(h_n, unsorted_indices))

    def _check_forward_args(self, x: Tensor, hx: Optional[Tensor], batch: int) -> None:
        """nn.GRU's checks, with its messages. x is [T, B, I] or packed data [N, I]."""
        weight = self.weight_ih_l0
        # Under torch.autocast the dtypes may differ, as in nn.GRU: ops.gru casts them.
        autocast = torch._C._is_any_autocast_enabled()
        if x.dtype != weight.dtype and not autocast:
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). "
                f"Convert input: input.to({weight.dtype}), or convert model: "
                f"model.to({x.dtype})")
        if x.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {x.size(-1)}")
        if x.dim() == 3 and x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        for name in self._flat_weights_names:
            p = getattr(self, name)
            if p.device != x.device:
                raise RuntimeError(
                    f"Input and parameter tensors are not at the same device, found input "
                    f"tensor at {x.device} and parameter tensor at {p.device}")
        if hx is None:
            return
        num_directions = 2 if self.bidirectional else 1
        self.check_hidden_size(hx, (self.num_layers * num_directions, batch, self.hidden_size))
        if hx.device != x.device:
            raise RuntimeError(
                f"Input and hidden tensors are not at the same device, found input tensor "
                f"at {x.device} and hidden tensor at {hx.device}")
        # nn.GRU fails here deep inside a matmul ("mat1 and mat2 must have the same
        # dtype"); say which tensor is wrong instead.
        if hx.dtype != x.dtype and not autocast:
            raise ValueError(
                f"RNN hx dtype ({hx.dtype}) does not match input dtype ({x.dtype}). "
                f"Convert hx: hx.to({x.dtype})")

    def _run_layers(
        self, x: Tensor, hx: Optional[Tensor], lengths: Optional[Tensor],
    ) -> Tuple[Tensor, List[Tensor]]:
        """The layer stack on x [T, B, I]; returns (output [T, B, D*H], L*D states [B, H]).

        With lengths (packed input: [B] on the CPU, sorted by decreasing length), x and
        every layer's output are padded [T, B, .]; the padding is never read, since the op
        keeps a sequence's state fixed at steps past its length and starts its reverse
        direction at its own last step. Dropout is applied to the packed rows only, as
        nn.GRU does.
        """
        num_directions = 2 if self.bidirectional else 1
        # An exported eval-mode model is for inference: it captures the op that keeps no
        # workspace for a backward.
        inference = not self.training and torch.compiler.is_exporting()
        finals: List[Tensor] = []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                k = layer * num_directions + direction  # index into hx and _all_weights
                names = self._all_weights[k]
                weight_ih, weight_hh = getattr(self, names[0]), getattr(self, names[1])
                bias_ih = getattr(self, names[2]) if self.bias else None
                bias_hh = getattr(self, names[3]) if self.bias else None
                out, h = ops._gru(
                    layer_input, None if hx is None else hx[k], weight_ih, weight_hh,
                    bias_ih, bias_hh, reset_after=self.reset_after,
                    reverse=direction == 1, lengths=lengths, inference=inference)
                outputs.append(out)  # [T, B, H]
                finals.append(h)  # [B, H]
            layer_output = outputs[0] if num_directions == 1 else torch.cat(outputs, 2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_output = self._dropout(layer_output, lengths)
            layer_input = layer_output
        return layer_input, finals

    def _dropout(self, y: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """Dropout between layers on y [T, B, D*H], drawing the same mask as nn.GRU.

        nn.GRU drops out its packed data [N, D*H] for packed input (lengths given) and the
        whole [T, B, D*H] tensor otherwise; doing the same consumes the RNG identically,
        so a seeded FusedGRU drops the same units as a seeded nn.GRU.
        """
        if lengths is None:
            return F.dropout(y, self.dropout, training=True)
        packed, batch_sizes = torch._pack_padded_sequence(y, lengths, False)  # [N, C]
        kept = F.dropout(packed, self.dropout, training=True)
        return torch._pad_packed_sequence(kept, batch_sizes, False, 0.0, y.size(0))[0]


class QuantizedDynamicFusedGRU(torch.ao.nn.quantized.dynamic.GRU):
    """What ``torch.ao.quantization.quantize_dynamic`` turns a FusedGRU into: PyTorch's
    dynamically quantized GRU (int8 or float16 weights), built from an ``nn.GRU`` with the
    FusedGRU's weights. Registered in PyTorch's default dynamic-quantization mapping when
    gru_fused is imported, so ``quantize_dynamic(model, {FusedGRU}, dtype=torch.qint8)``
    (naming FusedGRU, as one names nn.GRU) quantizes it; like nn.GRU, it is left in float
    unless named or given a qconfig. Only nn.GRU's formula has a quantized kernel:
    ``reset_after=False`` raises.
    """

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant=False):
        if not isinstance(mod, FusedGRU):
            raise TypeError(f"QuantizedDynamicFusedGRU.from_float takes a FusedGRU, got "
                            f"{type(mod).__name__}")
        if not mod.reset_after:
            raise RuntimeError(
                "quantize_dynamic: a FusedGRU with reset_after=False cannot be quantized: "
                "PyTorch's dynamically quantized GRU computes nn.GRU's formula "
                "(reset_after=True) only. Leave this module out of the qconfig_spec.")
        gru = nn.GRU(mod.input_size, mod.hidden_size, mod.num_layers, mod.bias,
                     mod.batch_first, mod.dropout, mod.bidirectional)
        gru.load_state_dict({k: v.detach().float().cpu() for k, v in mod.state_dict().items()})
        gru.qconfig = getattr(mod, "qconfig", None)
        return torch.ao.nn.quantized.dynamic.GRU.from_float(
            gru, use_precomputed_fake_quant=use_precomputed_fake_quant)


torch.ao.quantization.quantization_mappings.DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS[FusedGRU] = (
    QuantizedDynamicFusedGRU)
