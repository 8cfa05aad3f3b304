"""Regression tests of the "arguments are read-only, no silently wrong value" issue.

Each test names the defect it guards; each failed on the code before the fix. The
property-based guard over random configurations is tests/test_properties.py.
"""
import pytest
import torch
import torch.nn.functional as F

import gru_fused
from gru_fused import reference

from test_ops import make_args


def _snapshot(tensors):
    return [None if t is None else t.detach().clone() for t in tensors]


def _assert_unchanged(tensors, before):
    for t, b in zip(tensors, before):
        if t is not None:
            assert torch.equal(t.detach(), b), "an argument was written"


def _one_hot(T, B, I, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.one_hot(torch.randint(0, I, (T, B), generator=g), I).to(dtype)


# --- 1. the bias fold wrote into weight_ih ---------------------------------------------

def test_fused_gru_input_size_1_leaves_weights_alone():
    """The issue's repro: I = 1 makes weight_ih.t().contiguous() weight_ih itself."""
    torch.manual_seed(0)
    ref = torch.nn.GRU(1, 4)
    m = gru_fused.FusedGRU(1, 4)
    m.load_state_dict(ref.state_dict())
    before = _snapshot(list(m.parameters()))
    x = torch.ones(5, 2, 1)
    for grad in (False, True, False):
        with torch.set_grad_enabled(grad):
            out, h_n = m(x)
            want, want_h = ref(x)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(h_n, want_h)
    _assert_unchanged(list(m.parameters()), before)


@pytest.mark.parametrize("reset_after", [True, False])
def test_transposed_weight_ih_with_one_hot_input(reset_after):
    """weight_ih as the transposed view of an [I, 3H] matrix (the book's W_x.t())."""
    T, B, I, H = 4, 3, 6, 5
    x = _one_hot(T, B, I)
    _, hx, w_ih, w_hh, b_ih, b_hh = make_args(T, B, I, H, requires_grad=False)
    w_ih_t = w_ih.t().contiguous().t()  # [3H, I] with strides (1, 3H)
    args = [x, hx, w_ih_t, w_hh, b_ih, b_hh]
    before = _snapshot(args)
    want, want_h = reference.gru_layer(x, hx, w_ih, w_hh, b_ih, b_hh, reset_after)
    for grad in (False, True, True):
        leaves = [a.detach().requires_grad_(grad) for a in args[1:]]
        out, h_n = gru_fused.gru(x, *leaves, reset_after=reset_after)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n, want_h, rtol=1e-12, atol=1e-12)
        if grad:
            (out.sum() + h_n.sum()).backward()
    _assert_unchanged(args, before)
    # opcheck compares the arguments before and after ("not defined as mutable but was
    # mutated"), with the one-hot input that takes the table path.
    torch.library.opcheck(torch.ops.gru_fused.gru_forward.default,
                          (x, hx, w_ih_t, w_hh, b_ih, b_hh, None, reset_after, False))
    torch.library.opcheck(torch.ops.gru_fused.gru_inference.default,
                          (x, hx, w_ih_t, w_hh, b_ih, b_hh, None, reset_after, False))


# --- 2. strided lengths were read as raw memory ------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
def test_strided_and_expanded_lengths(reverse):
    T, B, I, H = 5, 3, 4, 6
    args = make_args(T, B, I, H)
    strided = torch.tensor([5, 0, 3, 0, 1, 0])[::2]
    assert not strided.is_contiguous()
    got = gru_fused.gru(*args, reverse=reverse, lengths=strided)
    want = gru_fused.gru(*args, reverse=reverse, lengths=strided.contiguous())
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    gw = torch.autograd.grad(got[0].sum() + got[1].sum(), [a for a in args if a is not None])
    ww = torch.autograd.grad(want[0].sum() + want[1].sum(), [a for a in args if a is not None])
    for g, w in zip(gw, ww):
        assert torch.equal(g, w)

    # An expanded tensor has stride 0: read as [B] raw values it ran past its 8 bytes.
    B = 4096
    x, hx, w_ih, w_hh, b_ih, b_hh = make_args(3, B, 2, 3, requires_grad=False)
    expanded = torch.tensor([1]).expand(B)
    out, h_n = gru_fused.gru(x, hx, w_ih, w_hh, b_ih, b_hh, reverse=reverse, lengths=expanded)
    one, h_one = gru_fused.gru(x[:1], hx, w_ih, w_hh, b_ih, b_hh, reverse=reverse)
    torch.testing.assert_close(h_n, h_one, rtol=0, atol=0)
    torch.testing.assert_close(out[0], one[0], rtol=0, atol=0)


# --- 3. forward-mode AD was silently zero --------------------------------------------------

def _module_pair(reset_after=True, **kw):
    torch.manual_seed(0)
    ref = torch.nn.GRU(3, 4, dtype=torch.float64, **kw)
    m = gru_fused.FusedGRU(3, 4, dtype=torch.float64, reset_after=reset_after, **kw)
    m.load_state_dict(ref.state_dict())
    return ref, m


@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "bidirectional": True},
                                {"batch_first": True, "bias": False}],
                         ids=["1layer", "2layer-bi", "batch_first-nobias"])
def test_jvp_matches_nn_gru(kw):
    ref, m = _module_pair(**kw)
    g = torch.Generator().manual_seed(1)
    shape = (2, 5, 3) if kw.get("batch_first") else (5, 2, 3)
    x, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    h0, vh = (torch.randn(kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1),
                          2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    params = dict(m.named_parameters())
    tangents = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}

    def run(mod):
        def f(x, h0, p):
            out, h_n = torch.func.functional_call(mod, p, (x, h0))
            return out, h_n
        return torch.func.jvp(f, (x, h0, params), (v, vh, tangents))

    (out, h_n), (t_out, t_hn) = run(m)
    (want, want_h), (want_t, want_th) = run(ref)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(t_out, want_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t_hn, want_th, rtol=1e-10, atol=1e-12)
    assert t_out.abs().max() > 0.1  # not a silent zero


def test_forward_ad_api_matches_nn_gru():
    """torch.autograd.forward_ad with trainable parameters (it raised) and without (it
    returned a None tangent)."""
    import torch.autograd.forward_ad as fwAD

    ref, m = _module_pair()
    x, v = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    for trainable in (True, False):
        for p in (*ref.parameters(), *m.parameters()):
            p.requires_grad_(trainable)
        tangents = []
        for mod in (m, ref):
            with fwAD.dual_level():
                out, _ = mod(fwAD.make_dual(x, v))
                tangents.append(fwAD.unpack_dual(out).tangent)
        assert tangents[0] is not None
        torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_jvp_agrees_with_vjp(reset_after, reverse, packed):
    """<u, J v> from the jvp equals <J^T u, v> from the (gradchecked) backward, for both
    formulas, reverse and lengths, including the padding's NaN."""
    T, B, I, H = 5, 3, 4, 6
    primals = list(make_args(T, B, I, H, requires_grad=False))
    lengths = torch.tensor([5, 2, 0]) if packed else None
    if packed:
        primals[0] = primals[0].clone()
        primals[0][3:, 1] = float("nan")  # padding
    g = torch.Generator().manual_seed(7)
    tangents = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in primals]
    if packed:
        tangents[0][3:, 1] = float("nan")

    def f(*a):
        return gru_fused.gru(*a, reset_after=reset_after, reverse=reverse, lengths=lengths)

    _, (t_out, t_hn) = torch.func.jvp(f, tuple(primals), tuple(tangents))
    u_out, u_hn = torch.randn(T, B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    _, vjp_fn = torch.func.vjp(f, *primals)
    cotangents = vjp_fn((u_out, u_hn))
    lhs = (u_out * t_out).sum() + (u_hn * t_hn).sum()
    rhs = sum((c * torch.nan_to_num(t, nan=0.0)).sum() for c, t in zip(cotangents, tangents))
    assert torch.isfinite(lhs)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


# --- 4. the fake backward's strides ---------------------------------------------------------

def test_compile_batch_first_input_requiring_grad():
    torch.manual_seed(0)
    m = gru_fused.FusedGRU(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3, requires_grad=True)
    # Inductor checks every custom op output against the fake kernel's strides.
    out, h_n = torch.compile(m, fullgraph=True)(x)
    (out.sum() + h_n.sum()).backward()
    want_x = x.grad.clone()
    x.grad = None
    out_e, h_e = m(x)
    (out_e.sum() + h_e.sum()).backward()
    torch.testing.assert_close(x.grad, want_x)


@pytest.mark.parametrize("reset_after", [True, False])
def test_opcheck_odd_layouts(reset_after):
    """Transposed, sliced and expanded inputs and weights through every op."""
    T, B, I, H = 3, 2, 4, 5
    x, hx, w_ih, w_hh, b_ih, b_hh = make_args(T, B, I, H, requires_grad=False)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # batch_first memory
    hx = hx.t().contiguous().t()
    w_ih = w_ih.t().contiguous().t()
    w_hh = torch.cat([w_hh, w_hh], 1)[:, ::2]
    b_hh = b_hh[:1].expand(3 * H)
    lengths = torch.tensor([3, 9, 2, 9])[::2]
    for args in ((x, hx, w_ih, w_hh, b_ih, b_hh, None, reset_after, False),
                 (x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reset_after, True)):
        torch.library.opcheck(torch.ops.gru_fused.gru_forward.default, args)
        torch.library.opcheck(torch.ops.gru_fused.gru_inference.default, args)
        out, h_n, ws = torch.ops.gru_fused.gru_forward(*args)
        go = torch.randn(B, T, H, dtype=x.dtype).transpose(0, 1)
        gh = torch.randn(H, B, dtype=x.dtype).t()
        for mask in ([True] * 6, [True, False, False, True, False, True]):
            bw = (go, gh, x, hx, w_ih, w_hh, out, ws, args[6], True, reset_after, args[8], mask)
            torch.library.opcheck(torch.ops.gru_fused.gru_backward.default, bw)


# --- 5. a meta tensor beside CPU tensors -----------------------------------------------------

@pytest.mark.parametrize("which", ["weight_hh", "bias_hh", "hx", "lengths"])
def test_meta_argument_beside_cpu_raises(which):
    x, hx, w_ih, w_hh, b_ih, b_hh = make_args(3, 2, 4, 5, requires_grad=False)
    kw = dict(hx=hx, weight_ih=w_ih, weight_hh=w_hh, bias_ih=b_ih, bias_hh=b_hh,
              lengths=torch.tensor([3, 1]))
    kw[which] = kw[which].to("meta")
    for grad in (False, True):
        if grad:
            kw["weight_ih"] = w_ih.clone().requires_grad_()
        with pytest.raises(RuntimeError, match=which):
            gru_fused.gru(x, kw["hx"], kw["weight_ih"], kw["weight_hh"], kw["bias_ih"],
                          kw["bias_hh"], lengths=kw["lengths"])


def test_all_meta_gives_meta_shapes():
    x, hx, w_ih, w_hh, b_ih, b_hh = (t.to("meta") for t in make_args(3, 2, 4, 5,
                                                                      requires_grad=False))
    out, h_n = gru_fused.gru(x, hx, w_ih, w_hh, b_ih, b_hh)
    assert out.device.type == "meta" and out.shape == (3, 2, 5) and h_n.shape == (2, 5)


# --- 6. NaN in the padding ------------------------------------------------------------------

@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("one_hot", [False, True])
def test_non_finite_padding_takes_no_part(reset_after, reverse, one_hot):
    T, B, I, H = 6, 3, 4, 5
    args = list(make_args(T, B, I, H, requires_grad=False))
    if one_hot:
        args[0] = _one_hot(T, B, I)
    lengths = torch.tensor([6, 2, 4])
    padding = torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)  # [T, B]
    clean = args[0].masked_fill(padding.unsqueeze(2), 0.0)
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        x = clean.masked_fill(padding.unsqueeze(2), fill)
        leaves = [a.detach().requires_grad_() for a in (x, *args[1:])]
        out, h_n = gru_fused.gru(*leaves, reset_after=reset_after, reverse=reverse,
                                 lengths=lengths)
        grads = torch.autograd.grad((out * 1.5).sum() + h_n.sum(), leaves)
        results.append([out, h_n, *grads])
    for got in results[1:]:
        for g, w in zip(got, results[0]):
            assert torch.isfinite(g).all()
            assert torch.equal(g, w)
    assert torch.equal(results[0][2].masked_select(padding.unsqueeze(2)),
                       torch.zeros(int(padding.sum()) * I, dtype=torch.float64))


# --- 7. float64 one-hot detection was done in float32 -------------------------------------

def test_float64_near_one_hot_is_not_rounded():
    torch.manual_seed(0)
    ref = torch.nn.GRU(5, 4, dtype=torch.float64)
    m = gru_fused.FusedGRU(5, 4, dtype=torch.float64)
    m.load_state_dict(ref.state_dict())
    x = _one_hot(6, 3, 5) * (1 + 1e-9)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=1e-14, atol=1e-15)
    # Tiny off entries (zero in float32) against huge weights change the state.
    with torch.no_grad():
        m.weight_ih_l0.mul_(1e30)
        ref.weight_ih_l0.mul_(1e30)
        x = _one_hot(6, 3, 5)
        x[x == 0] = 1e-40
        torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=1e-12, atol=1e-14)


# --- 8. NaN/inf propagation as in nn.GRU --------------------------------------------------

def _nan_inf_pattern(t):
    return torch.isnan(t), torch.isinf(t)


@pytest.mark.parametrize("case", ["dense_inf_input", "dense_neg_inf_input",
                                  "one_hot_nan_hx", "one_hot_inf_hx"])
def test_non_finite_propagates_as_in_nn_gru(case):
    torch.manual_seed(0)
    T, B, I, H = 3, 2, 4, 3
    ref = torch.nn.GRU(I, H)
    m = gru_fused.FusedGRU(I, H)
    m.load_state_dict(ref.state_dict())
    h0 = torch.randn(1, B, H)
    if case.startswith("dense"):
        x = torch.randn(T, B, I)
        x[1, 0, 2] = float("-inf") if "neg" in case else float("inf")
    else:
        x = _one_hot(T, B, I, dtype=torch.float32)
        h0[0, 1, 1] = float("nan") if "nan" in case else float("inf")
    results = []
    for mod in (ref, m):
        xx, hh = x.clone().requires_grad_(), h0.clone().requires_grad_()
        out, h_n = mod(xx, hh)
        (out.sum() + h_n.sum()).backward()
        results.append([out, h_n, xx.grad, hh.grad, *(p.grad for p in mod.parameters())])
    names = ["output", "h_n", "grad input", "grad h0", *(n for n, _ in m.named_parameters())]
    for name, want, got in zip(names, *results):
        for w, g in zip(_nan_inf_pattern(want), _nan_inf_pattern(got)):
            assert torch.equal(w, g), f"{case}: {name}: nn.GRU {want} vs FusedGRU {got}"
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-5)


# --- 9. B = 0 with lengths -----------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
def test_empty_batch_with_lengths(reverse):
    args = make_args(3, 0, 4, 5)
    out, h_n = gru_fused.gru(*args, reverse=reverse, lengths=torch.zeros(0, dtype=torch.long))
    assert out.shape == (3, 0, 5) and h_n.shape == (0, 5)
    grads = torch.autograd.grad(out.sum() + h_n.sum(), [a for a in args if a is not None])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# --- the memory the ops keep ----------------------------------------------------------------

def test_empty_cache_releases_what_is_kept():
    gru_fused.empty_cache()
    assert gru_fused.cached_bytes() == 0
    # Forward + backward at a shape whose workspace (4 T B H floats, 64 MiB) goes through
    # the pool and whose scratch buffers stay in this thread's cache.
    T, B, I, H = 128, 128, 8, 256
    x = torch.randn(T, B, I)
    w = [torch.randn(3 * H, I, requires_grad=True), torch.randn(3 * H, H) * 0.01]
    out, h_n = gru_fused.gru(x, None, *w)
    out.sum().backward()
    del out, h_n
    kept = gru_fused.cached_bytes()
    assert kept >= 4 * T * B * H * 4  # the freed workspace at least
    # The documented bound: 4 scratch roles of at most 32 MiB per thread, 2 pooled blocks.
    assert kept <= 4 * (32 << 20) + 2 * (2 * 4 * T * B * H * 4)
    assert gru_fused.empty_cache() == kept
    assert gru_fused.cached_bytes() == 0

