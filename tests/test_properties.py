"""Property-based checks (hypothesis, derandomised): arguments are read-only, and no path
returns a silently wrong value.

Random tiny configurations (T 1..5, B 0..3, I in {1, 2, 3, 5}, H in {1, 2, 4}), float64,
CPU, compared with torch.nn.GRU and with gru_fused.reference:

- ``test_fused_gru_module_matches_nn_gru``: FusedGRU against nn.GRU with the same
  state_dict, over layers, directions, bias, batch_first, padded / packed / unbatched
  input, one-hot or dense input, requires_grad on or off, and FusedGRU's parameters in
  odd memory layouts (transposed views, strided slices, narrowed windows of a bigger
  tensor) with the same values.
- ``test_gru_op_matches_reference``: ``gru_fused.gru`` (one layer, one direction) against
  ``reference.gru_layer`` for both formulas and both directions, with ``lengths`` (run
  one sequence at a time in the reference) in odd layouts too (strided, expanded, with a
  storage offset), and every tensor argument in odd layouts; nn.GRU as well for
  reset_after=True without lengths.
- ``test_gru_op_ignores_nonfinite_padding``: NaN / inf at the padded positions of x
  (t >= lengths[b]) must not reach any output or gradient.

Each case runs every call twice (under torch.no_grad() and with grad), checks that the two
runs are bitwise identical, and after every call that each argument (its shape, strides,
storage offset, storage and every byte of that storage, the unused bytes around a strided
view included) is exactly as before.

The unused memory around strided / narrowed views is filled with NaN: a kernel that reads
a view as if it were contiguous gets NaN, not a plausible wrong number.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import gru_fused
from gru_fused import reference

DT = torch.float64
# Both sides compute the same float64 formula in different summation orders: a few ulps.
TOL = dict(rtol=1e-7, atol=1e-9)
SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TS = st.integers(1, 5)
BS = st.sampled_from([1, 2, 3, 0])  # shrinks towards the first
IS = st.sampled_from([1, 2, 3, 5])
HS = st.sampled_from([1, 2, 4])
WEIGHT_LAYOUTS = ["contiguous", "transposed", "strided", "narrow"]
BIAS_LAYOUTS = ["contiguous", "strided", "narrow"]
INPUT_LAYOUTS = ["contiguous", "transposed", "strided", "narrow", "expanded"]
FILL = float("nan")  # the unused memory around strided / narrowed views


# ----------------------------------------------------------------------------- helpers

def relayout(values: torch.Tensor, layout: str, batch_dim: int = 0) -> torch.Tensor:
    """A tensor with values' shape and elements in the given memory layout (a leaf)."""
    if layout == "contiguous":
        out = values.clone()
    elif layout == "transposed":  # all dims reversed: the same numbers, column-major
        dims = list(range(values.dim()))[::-1]
        out = values.permute(dims).contiguous().permute(dims)
    elif layout == "strided":  # every other element of the last dim of a bigger tensor
        big = values.new_full((*values.shape[:-1], 2 * values.shape[-1]), FILL)
        out = big[..., ::2]
        out.copy_(values)
    elif layout == "narrow":  # a window inside a bigger tensor, with a storage offset
        big = values.new_full(tuple(s + 3 for s in values.shape), FILL)
        out = big[tuple(slice(1, 1 + s) for s in values.shape)]
        out.copy_(values)
    elif layout == "expanded":  # stride 0 along batch_dim: values must not vary along it
        first = values.narrow(batch_dim, 0, min(1, values.shape[batch_dim]))
        torch.testing.assert_close(first.expand(values.shape), values, rtol=0, atol=0,
                                   equal_nan=True)
        out = first.clone().expand(values.shape)
    else:
        raise ValueError(layout)
    return out.detach()


def _layout_of(t: Optional[torch.Tensor]) -> str:
    if t is None:
        return "None"
    return f"shape={tuple(t.shape)} stride={t.stride()} offset={t.storage_offset()}"


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def snapshot(args: Dict[str, Optional[torch.Tensor]]) -> Dict[str, tuple]:
    return {name: (tuple(t.shape), t.stride(), t.storage_offset(),
                   t.untyped_storage().data_ptr(), _storage_bytes(t).clone(),
                   t.detach().clone())
            for name, t in args.items() if t is not None}


def assert_unchanged(args: Dict[str, Optional[torch.Tensor]], snaps: Dict[str, tuple],
                     when: str) -> None:
    """Every argument is bit for bit what it was: layout, storage and all its bytes."""
    for name, snap in snaps.items():
        t = args[name]
        shape, stride, offset, ptr, raw, values = snap
        now = (tuple(t.shape), t.stride(), t.storage_offset(), t.untyped_storage().data_ptr())
        assert now == (shape, stride, offset, ptr), (
            f"argument {name} changed layout/storage {when}: {now} != "
            f"{(shape, stride, offset, ptr)}")
        if not torch.equal(_storage_bytes(t), raw):
            cur = t.detach()
            same = (cur == values) | (cur.isnan() & values.isnan()) if cur.is_floating_point() \
                else cur == values
            bad = (~same).nonzero().tolist()
            raise AssertionError(
                f"argument {name} ({_layout_of(t)}) was written to {when}: "
                f"{len(bad)} of its elements changed (first at {bad[:3]}); "
                f"before {values.flatten().tolist()[:12]} after {cur.flatten().tolist()[:12]}"
                if bad else
                f"argument {name} ({_layout_of(t)}) was written to {when}: its elements are "
                f"unchanged but the unused bytes of its storage changed")


def assert_close_all(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor],
                     what: str) -> None:
    assert got.keys() == want.keys(), (what, sorted(got), sorted(want))
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL,
                                   msg=lambda m, key=key: f"{what}, {key}: {m}")


def assert_bitwise_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor],
                         what: str) -> None:
    for key in a:
        assert torch.equal(a[key], b[key]), (
            f"{what}: {key} differs between two identical calls (state drift); max diff "
            f"{(a[key] - b[key]).abs().max().item() if a[key].numel() else 0}")


def _projection_loss(out: torch.Tensor, h_n: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of output and h_n: every element gets its own weight."""
    gen = torch.Generator().manual_seed(12345)
    w_out = torch.randn(out.shape, generator=gen, dtype=DT)
    w_h = torch.randn(h_n.shape, generator=gen, dtype=DT)
    return (out * w_out).sum() + (h_n * w_h).sum()


def _grads(loss: torch.Tensor, targets: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """d loss / d each target; zeros for a target the loss does not depend on (B = 0)."""
    if not targets:
        return {}
    if not loss.requires_grad:
        return {f"grad {k}": torch.zeros_like(v) for k, v in targets.items()}
    # retain_graph: a packed input's packing graph serves every call.
    grads = torch.autograd.grad(loss, list(targets.values()), allow_unused=True,
                                retain_graph=True)
    return {f"grad {k}": torch.zeros_like(v) if g is None else g
            for (k, v), g in zip(targets.items(), grads)}


def _one_hot(shape, gen) -> torch.Tensor:
    cols = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    return torch.nn.functional.one_hot(cols, shape[-1]).to(DT)


def _requires(args: Dict[str, Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in args.items() if v is not None and v.requires_grad}


# ------------------------------------------------------- FusedGRU against nn.GRU

@dataclasses.dataclass
class ModuleCase:
    T: int
    B: int
    I: int
    H: int
    num_layers: int
    bidirectional: bool
    bias: bool
    batch_first: bool
    form: str                  # "padded" ([T, B, I] / [B, T, I]), "packed", "unbatched"
    lengths: Optional[List[int]]  # packed only, in [1, T]
    one_hot: bool
    with_hx: bool
    input_layout: str
    hx_layout: str
    param_layouts: Dict[str, str]
    input_grad: bool
    hx_grad: bool
    params_grad: bool
    seed: int


def _param_names(num_layers: int, bidirectional: bool, bias: bool) -> List[str]:
    names = []
    for layer in range(num_layers):
        for sfx in ("", "_reverse") if bidirectional else ("",):
            kinds = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else [])
            names += [f"{k}_l{layer}{sfx}" for k in kinds]
    return names


@st.composite
def module_cases(draw) -> ModuleCase:
    T, I, H = draw(TS), draw(IS), draw(HS)
    form = draw(st.sampled_from(["padded", "packed", "unbatched"]))
    if form == "unbatched":
        B = 1
    elif form == "packed":  # pack_padded_sequence needs at least one sequence
        B = draw(st.sampled_from([1, 2, 3]))
    else:
        B = draw(BS)
    num_layers = draw(st.integers(1, 2))
    bidirectional, bias, batch_first = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    lengths = (draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
               if form == "packed" else None)
    names = _param_names(num_layers, bidirectional, bias)
    param_layouts = {n: draw(st.sampled_from(BIAS_LAYOUTS if n.startswith("bias")
                                             else WEIGHT_LAYOUTS)) for n in names}
    with_hx = draw(st.booleans())
    return ModuleCase(
        T=T, B=B, I=I, H=H, num_layers=num_layers, bidirectional=bidirectional, bias=bias,
        batch_first=batch_first, form=form, lengths=lengths, one_hot=draw(st.booleans()),
        with_hx=with_hx,
        input_layout=draw(st.sampled_from(WEIGHT_LAYOUTS)),
        hx_layout=draw(st.sampled_from(WEIGHT_LAYOUTS)),
        param_layouts=param_layouts,
        input_grad=draw(st.booleans()), hx_grad=with_hx and draw(st.booleans()),
        params_grad=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def _pack(x: torch.Tensor, case: ModuleCase):
    if case.form != "packed":
        return x
    return pack_padded_sequence(x, torch.tensor(case.lengths), batch_first=case.batch_first,
                                enforce_sorted=False)


def _module_run(module, x, inp, hx, case: ModuleCase, with_grad: bool
                ) -> Dict[str, torch.Tensor]:
    """x: the leaf; inp: what the module gets (x, or x packed)."""
    out, h_n = module(inp, hx)
    out_t = out.data if isinstance(out, PackedSequence) else out
    result = {"output": out_t.detach().clone(), "h_n": h_n.detach().clone()}
    if with_grad:
        targets = _requires({"input": x, "hx": hx, **dict(module.named_parameters())})
        result.update(_grads(_projection_loss(out_t, h_n), targets))
    return result


@settings(max_examples=400, **SETTINGS)
@given(case=module_cases())
def test_fused_gru_module_matches_nn_gru(case: ModuleCase):
    D = 2 if case.bidirectional else 1
    torch.manual_seed(case.seed)
    ref = nn.GRU(case.I, case.H, case.num_layers, case.bias, case.batch_first, 0.0,
                 case.bidirectional, dtype=DT)
    fused = gru_fused.FusedGRU(case.I, case.H, case.num_layers, case.bias, case.batch_first,
                               0.0, case.bidirectional, dtype=DT)
    fused.load_state_dict(ref.state_dict())
    for name, p in fused.named_parameters():
        p.data = relayout(p.data, case.param_layouts[name])
        torch.testing.assert_close(p, getattr(ref, name), rtol=0, atol=0)
    for p in [*ref.parameters(), *fused.parameters()]:
        p.requires_grad_(case.params_grad)

    gen = torch.Generator().manual_seed(case.seed)
    if case.form == "unbatched":
        x_shape, hx_shape = (case.T, case.I), (case.num_layers * D, case.H)
    else:
        x_shape = ((case.B, case.T, case.I) if case.batch_first else (case.T, case.B, case.I))
        hx_shape = (case.num_layers * D, case.B, case.H)
    x_vals = _one_hot(x_shape, gen) if case.one_hot else torch.randn(x_shape, generator=gen,
                                                                     dtype=DT)
    hx_vals = torch.randn(hx_shape, generator=gen, dtype=DT) if case.with_hx else None

    x_ref = x_vals.clone().requires_grad_(case.input_grad)
    hx_ref = None if hx_vals is None else hx_vals.clone().requires_grad_(case.hx_grad)
    x = relayout(x_vals, case.input_layout).requires_grad_(case.input_grad)
    hx = None if hx_vals is None else relayout(hx_vals, case.hx_layout).requires_grad_(
        case.hx_grad)
    note(f"input {_layout_of(x)}, hx {_layout_of(hx)}")
    note("parameters: " + ", ".join(f"{n} {_layout_of(p)}"
                                     for n, p in fused.named_parameters()))

    inp, inp_ref = _pack(x, case), _pack(x_ref, case)
    args = {"input": x, "hx": hx, **dict(fused.named_parameters())}
    if isinstance(inp, PackedSequence):
        args.update({f"packed.{f}": getattr(inp, f) for f in inp._fields})
    snaps = snapshot(args)

    with torch.no_grad():
        want = _module_run(ref, x_ref, inp_ref, hx_ref, case, with_grad=False)
    runs = []
    for call in ("no_grad call 1", "no_grad call 2"):
        with torch.no_grad():
            got = _module_run(fused, x, inp, hx, case, with_grad=False)
        assert_unchanged(args, snaps, f"by FusedGRU ({call})")
        assert_close_all(got, want, f"FusedGRU vs nn.GRU ({call})")
        runs.append(got)
    assert_bitwise_equal(*runs, "FusedGRU under no_grad")

    with_grad = bool(_requires(args))
    want = _module_run(ref, x_ref, inp_ref, hx_ref, case, with_grad)
    runs = []
    for call in ("grad call 1", "grad call 2"):
        got = _module_run(fused, x, inp, hx, case, with_grad)
        assert_unchanged(args, snaps, f"by FusedGRU forward+backward ({call})")
        assert_close_all(got, want, f"FusedGRU vs nn.GRU ({call})")
        runs.append(got)
    assert_bitwise_equal(*runs, "FusedGRU with grad")


# ------------------------------------------------- gru_fused.gru against the reference

@dataclasses.dataclass
class OpCase:
    T: int
    B: int
    I: int
    H: int
    bias: bool
    reset_after: bool
    reverse: bool
    with_hx: bool
    one_hot: bool
    lengths: Optional[List[int]]
    lengths_layout: Optional[str]  # None (no lengths), contiguous, strided, offset, expanded
    pad_fill: str                  # what the padded positions of x hold: same, random,
                                   # nan, inf (alternating +inf / -inf), mixed (nan and inf)
    layouts: Dict[str, str]        # x, hx, weight_ih, weight_hh, bias_ih, bias_hh
    requires_grad: Dict[str, bool]
    seed: int


ARG_NAMES = ["x", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]


@st.composite
def op_cases(draw, nonfinite_padding: bool = False) -> OpCase:
    T, I, H = draw(TS), draw(IS), draw(HS)
    B = draw(st.sampled_from([1, 2, 3])) if nonfinite_padding else draw(BS)
    bias, reset_after, reverse = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    with_hx, one_hot = draw(st.booleans()), draw(st.booleans())
    layouts = {
        "x": draw(st.sampled_from(INPUT_LAYOUTS)),
        "hx": draw(st.sampled_from(INPUT_LAYOUTS)),
        "weight_ih": draw(st.sampled_from(WEIGHT_LAYOUTS)),
        "weight_hh": draw(st.sampled_from(WEIGHT_LAYOUTS)),
        "bias_ih": draw(st.sampled_from(BIAS_LAYOUTS)),
        "bias_hh": draw(st.sampled_from(BIAS_LAYOUTS)),
    }
    kinds = ["contiguous", "strided", "offset", "expanded"]
    lengths_layout = draw(st.sampled_from(kinds if nonfinite_padding else [None, *kinds]))
    lengths = None
    if lengths_layout is not None:
        # An expanded lengths, or an expanded x with padding (which then sits at the same
        # steps of every sequence), needs one length for all.
        if lengths_layout == "expanded" or layouts["x"] == "expanded":
            lengths = [draw(st.integers(0, T - 1 if nonfinite_padding else T))] * B
        else:
            lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
            if nonfinite_padding and min(lengths) == T:  # at least one padded position
                lengths[draw(st.integers(0, B - 1))] = draw(st.integers(0, T - 1))
    if nonfinite_padding:
        pad_fill = draw(st.sampled_from(["nan", "inf", "mixed"]))
    else:
        pad_fill = draw(st.sampled_from(["same", "random"])) if lengths is not None else "same"
    grad_mode = draw(st.sampled_from(["all", "none", "some"]))
    requires_grad = {n: grad_mode == "all" or (grad_mode == "some" and draw(st.booleans()))
                     for n in ARG_NAMES}
    if not with_hx:
        requires_grad["hx"] = False
    if not bias:
        requires_grad["bias_ih"] = requires_grad["bias_hh"] = False
    return OpCase(T=T, B=B, I=I, H=H, bias=bias, reset_after=reset_after, reverse=reverse,
                  with_hx=with_hx, one_hot=one_hot, lengths=lengths,
                  lengths_layout=lengths_layout, pad_fill=pad_fill, layouts=layouts,
                  requires_grad=requires_grad, seed=draw(st.integers(0, 2 ** 16)))


def _make_lengths(case: OpCase) -> Optional[torch.Tensor]:
    """lengths in the drawn layout (as ``torch.tensor(vals * 2)[::2]`` or
    ``torch.tensor([v]).expand(B)`` would make them). The storage between or after the
    elements of a non-contiguous lengths holds other valid lengths (in [0, T], each unlike
    the length it follows), so a kernel reading it as contiguous memory gets wrong
    numbers, never out-of-bounds ones."""
    if case.lengths is None:
        return None
    vals, T = case.lengths, case.T
    other = [(v + 1) % (T + 1) for v in vals]
    if case.lengths_layout == "contiguous":
        out = torch.tensor(vals, dtype=torch.int64)
    elif case.lengths_layout == "strided":
        inter = [u for pair in zip(vals, other) for u in pair]
        out = torch.tensor(inter, dtype=torch.int64)[::2]
    elif case.lengths_layout == "offset":
        out = torch.tensor([(T + 1) // 2, *vals], dtype=torch.int64)[1:]
    elif case.lengths_layout == "expanded":
        v = vals[0] if vals else 0
        out = torch.tensor([v] + [(v + 1) % (T + 1)] * len(vals), dtype=torch.int64)
        out = out[:1].expand(len(vals))
    else:
        raise ValueError(case.lengths_layout)
    assert out.tolist() == vals
    return out


def _padded_mask(case: OpCase) -> torch.Tensor:
    """[T, B, 1] bool: True at the padded positions t >= lengths[b]."""
    if case.lengths is None:
        return torch.zeros(case.T, case.B, 1, dtype=torch.bool)
    return (torch.arange(case.T)[:, None] >= torch.tensor(case.lengths, dtype=torch.int64)[None, :]
            ).unsqueeze(2)


def _reference_op(case: OpCase, x, hx, w_ih, w_hh, b_ih, b_hh):
    """Expected (output, h_n) of gru_fused.gru from reference.gru_layer: with lengths, each
    sequence alone over its own steps; its padded positions repeat the carried state (the
    state after its last step forward; hx when reverse, as the reverse direction reaches
    the padding first)."""
    h0 = hx if hx is not None else x.new_zeros(case.B, case.H)
    if case.lengths is None:
        return reference.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, case.reset_after,
                                   case.reverse)
    if case.B == 0:
        return x.new_zeros(case.T, 0, case.H), x.new_zeros(0, case.H)
    outs, finals = [], []
    for b, n in enumerate(case.lengths):
        h_b = h0[b:b + 1]
        if n > 0:
            o, h = reference.gru_layer(x[:n, b:b + 1], h_b, w_ih, w_hh, b_ih, b_hh,
                                       case.reset_after, case.reverse)
        else:
            o, h = x.new_zeros(0, 1, case.H), h_b
        carried = h_b if case.reverse else h
        outs.append(torch.cat([o, carried.unsqueeze(0).expand(case.T - n, 1, case.H)]))
        finals.append(h)
    return torch.cat(outs, 1), torch.cat(finals, 0)


def _op_run(fn, args: Dict[str, Optional[torch.Tensor]], with_grad: bool):
    out, h_n = fn(*[args[n] for n in ARG_NAMES])
    result = {"output": out.detach().clone(), "h_n": h_n.detach().clone()}
    if with_grad:
        result.update(_grads(_projection_loss(out, h_n), _requires(args)))
    return result


def _op_values(case: OpCase, gen: torch.Generator) -> Dict[str, Optional[torch.Tensor]]:
    T, B, I, H = case.T, case.B, case.I, case.H
    x = _one_hot((T, B, I), gen) if case.one_hot else torch.randn(T, B, I, generator=gen,
                                                                  dtype=DT)
    hx = torch.randn(B, H, generator=gen, dtype=DT) if case.with_hx else None
    vals = {"x": x, "hx": hx,
            "weight_ih": torch.randn(3 * H, I, generator=gen, dtype=DT) * 0.6,
            "weight_hh": torch.randn(3 * H, H, generator=gen, dtype=DT) * 0.6,
            "bias_ih": torch.randn(3 * H, generator=gen, dtype=DT) * 0.5 if case.bias else None,
            "bias_hh": torch.randn(3 * H, generator=gen, dtype=DT) * 0.5 if case.bias else None}
    # An expanded layout repeats one batch row: make the values so.
    if case.layouts["x"] == "expanded" and B > 0:
        vals["x"] = x[:, :1].expand(T, B, I).clone()
    if case.layouts["hx"] == "expanded" and hx is not None and B > 0:
        vals["hx"] = hx[:1].expand(B, H).clone()
    return vals


def _fill_padding(case: OpCase, x: torch.Tensor, fill: str, gen) -> torch.Tensor:
    """x with its padded positions replaced (the same for every sequence at a step, so an
    expanded x stays expanded)."""
    if fill == "same" or case.lengths is None:
        return x
    T, B, I = x.shape
    if fill == "random":
        junk = torch.randn(T, 1, I, generator=gen, dtype=DT).expand(T, B, I) * 3
    elif fill == "zeros":
        junk = torch.zeros(T, B, I, dtype=DT)
    elif fill == "nan":
        junk = torch.full((T, B, I), float("nan"), dtype=DT)
    elif fill == "inf":
        sign = torch.where(torch.arange(T) % 2 == 0, 1.0, -1.0).to(DT)
        junk = (sign * float("inf"))[:, None, None].expand(T, B, I)
    elif fill == "mixed":
        junk = torch.where((torch.arange(T) % 2 == 0)[:, None, None],
                           torch.tensor(float("nan"), dtype=DT),
                           torch.tensor(float("inf"), dtype=DT)).expand(T, B, I)
    else:
        raise ValueError(fill)
    return torch.where(_padded_mask(case), junk, x)


def _assert_finite_despite_padding(case: OpCase, got: Dict[str, torch.Tensor], call: str):
    if case.pad_fill in ("nan", "inf", "mixed"):
        for k, v in got.items():
            assert torch.isfinite(v).all(), (
                f"{call}: {k} is not finite with non-finite values at padded positions "
                f"of x: {v.flatten().tolist()}")


def _check_op(case: OpCase) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    vals = _op_values(case, gen)
    x_fused_vals = _fill_padding(case, vals["x"], case.pad_fill, gen)
    lengths = _make_lengths(case)

    # The reference's arguments: plain contiguous leaves (padding irrelevant to it).
    ref_args = {n: None if v is None else v.clone().requires_grad_(case.requires_grad[n])
                for n, v in vals.items()}
    # gru_fused.gru's: the same values in the drawn layouts.
    fused_args = {}
    for n, v in vals.items():
        if n == "x":
            v = x_fused_vals
        fused_args[n] = None if v is None else relayout(
            v, case.layouts[n], batch_dim=1 if n == "x" else 0).requires_grad_(
            case.requires_grad[n])
    note("arguments: " + ", ".join(f"{n} {_layout_of(t)}" for n, t in fused_args.items()))
    note(f"lengths: {_layout_of(lengths)} values {None if lengths is None else lengths.tolist()}")
    note(f"x one-hot: {case.one_hot}; x as passed: "
         f"{fused_args['x'].detach().flatten().tolist()[:24]}")

    def fused(*a):
        return gru_fused.gru(*a, reset_after=case.reset_after, reverse=case.reverse,
                             lengths=lengths)

    def ref(*a):
        return _reference_op(case, *a)

    checked = {**fused_args, "lengths": lengths}
    snaps = snapshot(checked)
    with_grad = bool(_requires(fused_args))
    mask = _padded_mask(case)

    with torch.no_grad():
        want = _op_run(ref, ref_args, with_grad=False)
    runs = []
    for call in ("no_grad call 1", "no_grad call 2"):
        with torch.no_grad():
            got = _op_run(fused, fused_args, with_grad=False)
        assert_unchanged(checked, snaps, f"by gru_fused.gru ({call})")
        _assert_finite_despite_padding(case, got, call)
        assert_close_all(got, want, f"gru_fused.gru vs reference ({call})")
        runs.append(got)
    assert_bitwise_equal(*runs, "gru_fused.gru under no_grad")

    want = _op_run(ref, ref_args, with_grad)
    runs = []
    for call in ("grad call 1", "grad call 2"):
        got = _op_run(fused, fused_args, with_grad)
        assert_unchanged(checked, snaps, f"by gru_fused.gru forward+backward ({call})")
        _assert_finite_despite_padding(case, got, call)
        if "grad x" in got:
            padded_grad = got["grad x"].masked_select(mask.expand_as(got["grad x"]))
            assert torch.equal(padded_grad, torch.zeros_like(padded_grad)), (
                f"{call}: padded positions of x got a nonzero gradient: {padded_grad.tolist()}")
        assert_close_all(got, want, f"gru_fused.gru vs reference ({call})")
        runs.append(got)
    assert_bitwise_equal(*runs, "gru_fused.gru with grad")

    if case.pad_fill != "same":
        # The same call with zeros at the padded positions: the same results.
        zero_args = dict(fused_args)
        zero_args["x"] = _fill_padding(case, vals["x"], "zeros", gen).requires_grad_(
            case.requires_grad["x"])
        with_zero = _op_run(fused, zero_args, with_grad)
        assert_close_all(runs[0], with_zero, "padding junk vs zero padding")

    if case.reset_after and case.lengths is None:
        # nn.GRU is the reset_after formula; reverse=True is a bidirectional layer's
        # backward direction.
        gru = nn.GRU(case.I, case.H, bias=case.bias, bidirectional=case.reverse, dtype=DT)
        sfx = "_reverse" if case.reverse else ""
        with torch.no_grad():
            for n in ARG_NAMES[2:]:
                if vals[n] is not None:
                    getattr(gru, f"{n}_l0{sfx}").copy_(vals[n])
            h0 = vals["hx"] if vals["hx"] is not None else vals["x"].new_zeros(case.B, case.H)
            h0 = torch.stack([torch.zeros_like(h0), h0]) if case.reverse else h0[None]
            out, h_n = gru(vals["x"], h0)
        want_nn = {"output": out[..., case.H:] if case.reverse else out, "h_n": h_n[-1]}
        got_values = {k: runs[0][k] for k in ("output", "h_n")}
        assert_close_all(got_values, want_nn, "gru_fused.gru vs nn.GRU")


@settings(max_examples=800, **SETTINGS)
@given(case=op_cases())
def test_gru_op_matches_reference(case: OpCase):
    _check_op(case)


@settings(max_examples=250, **SETTINGS)
@given(case=op_cases(nonfinite_padding=True))
def test_gru_op_ignores_nonfinite_padding(case: OpCase):
    """NaN / inf at padded positions (t >= lengths[b]) reach no output and no gradient:
    every result is finite and equals the run with zeros there (and the reference)."""
    _check_op(case)


# --- NaN and inf propagate as in nn.GRU ---------------------------------------------------

NON_FINITE = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30]
PLACES = ["input", "h0", "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]


@settings(max_examples=300, **SETTINGS)
@given(T=st.integers(1, 4), B=st.integers(1, 3), I=st.integers(1, 4), H=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float64]), bias=st.booleans(),
       one_hot=st.booleans(), place=st.sampled_from(PLACES),
       value=st.sampled_from(NON_FINITE), where=st.integers(0, 10**6),
       seed=st.integers(0, 2**16))
def test_non_finite_values_propagate_as_in_nn_gru(T, B, I, H, dtype, bias, one_hot, place,
                                                  value, where, seed):
    """One NaN, inf or huge value in the input, h0 or a parameter: every output and
    gradient of FusedGRU is NaN, inf or finite exactly where nn.GRU's is, and equal to
    it where finite."""
    if place.startswith("bias") and not bias:
        place = "weight_hh_l0"
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ref = nn.GRU(I, H, bias=bias, dtype=dtype)
    fused = gru_fused.FusedGRU(I, H, bias=bias, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    x = (_one_hot((T, B, I), gen).to(dtype) if one_hot
         else torch.randn(T, B, I, generator=gen, dtype=dtype))
    h0 = torch.randn(1, B, H, generator=gen, dtype=dtype)
    with torch.no_grad():
        if place in ("input", "h0"):
            target = [x if place == "input" else h0]
        else:
            target = [getattr(ref, place), getattr(fused, place)]
        for t in target:
            t.view(-1)[where % t.numel()] = value
    note(f"{place}[{where % target[0].numel()}] = {value}")
    results = []
    for module in (ref, fused):
        xx, hh = x.clone().requires_grad_(), h0.clone().requires_grad_()
        out, h_n = module(xx, hh)
        (out.sum() * 1.25 + h_n.sum()).backward()
        results.append({"output": out, "h_n": h_n, "grad input": xx.grad, "grad h0": hh.grad,
                        **{f"grad {n}": p.grad for n, p in module.named_parameters()}})
    want, got = results
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)
    for name in want:
        w, g = want[name].detach(), got[name].detach()
        assert torch.equal(torch.isnan(w), torch.isnan(g)), f"{name}: NaN at other places"
        assert torch.equal(torch.isinf(w), torch.isinf(g)), f"{name}: inf at other places"
        assert torch.equal(w[torch.isinf(w)], g[torch.isinf(g)]), f"{name}: inf sign"
        finite = torch.isfinite(w)
        torch.testing.assert_close(g[finite], w[finite], rtol=rtol, atol=atol, msg=name)
