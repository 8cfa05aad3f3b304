"""GRUFunction with torch.func, autocast, jit.trace, quantization and torch.export: where
nn.GRU works, FusedGRU works the same way."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import gru_fused
from gru_fused.ops import GRUFunction


def pair(dtype=torch.float64, reset_after=True, **kw):
    """nn.GRU and a FusedGRU with the same weights."""
    torch.manual_seed(0)
    ref = nn.GRU(3, 4, dtype=dtype, **kw)
    fused = gru_fused.FusedGRU(3, 4, dtype=dtype, reset_after=reset_after, **kw)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def backward_names(t):
    """The names of every node of t's autograd graph."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


# --- GRUFunction is the autograd path -----------------------------------------------------

def test_fused_gru_and_scratch_go_through_gru_function():
    _, m = pair(num_layers=2, bidirectional=True)
    out, h_n = m(torch.randn(5, 2, 3, dtype=torch.float64))
    assert "GRUFunctionBackward" in backward_names(out)
    assert backward_names(out).count("GRUFunctionBackward") == 4  # 2 layers x 2 directions
    params = gru_fused.scratch.get_params(7, 5, "cpu")
    Y, (H,) = gru_fused.scratch.gru(torch.randn(3, 2, 7), gru_fused.scratch.init_gru_state(2, 5, "cpu"),
                                    params)
    assert "GRUFunctionBackward" in backward_names(Y)
    assert gru_fused.GRUFunction is GRUFunction


# --- torch.func transforms against nn.GRU ----------------------------------------------------

def _func_inputs(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, generator=g, dtype=torch.float64)
    params = {k: v.detach() for k, v in m.named_parameters()}
    return x, h0, params


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "jvp", "jacfwd", "hessian_raises"])
def test_func_transforms_match_nn_gru(transform):
    ref, m = pair()

    def loss_of(mod):
        def loss(params, x, h0):
            out, h_n = functional_call(mod, params, (x, h0))
            return (out.sin().sum() + h_n.pow(2).sum())
        return loss

    def outputs_of(mod):
        def f(params, x, h0):
            out, h_n = functional_call(mod, params, (x, h0))
            return out, h_n
        return f

    x, h0, params = _func_inputs(m)
    if transform == "hessian_raises":
        with pytest.raises(RuntimeError, match="second derivatives"):
            torch.func.hessian(loss_of(m), argnums=1)(params, x, h0)
        return
    results = []
    for mod in (ref, m):
        if transform == "grad":
            r = torch.func.grad(loss_of(mod), argnums=(0, 1, 2))(params, x, h0)
        elif transform == "vjp":
            out, fn = torch.func.vjp(outputs_of(mod), params, x, h0)
            g = torch.Generator().manual_seed(2)
            r = (out, fn(tuple(torch.randn(o.shape, generator=g, dtype=o.dtype) for o in out)))
        elif transform == "jacrev":
            r = torch.func.jacrev(outputs_of(mod), argnums=(1, 2))(params, x, h0)
        elif transform == "jacfwd":
            r = torch.func.jacfwd(outputs_of(mod), argnums=(1, 2))(params, x, h0)
        else:
            g = torch.Generator().manual_seed(3)
            tangents = ({k: torch.randn(v.shape, generator=g, dtype=v.dtype)
                         for k, v in params.items()},
                        torch.randn(x.shape, generator=g, dtype=x.dtype),
                        torch.randn(h0.shape, generator=g, dtype=h0.dtype))
            r = torch.func.jvp(outputs_of(mod), (params, x, h0), tangents)
        results.append(r)
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)


def _count_forward_calls(monkeypatch):
    calls = []
    original = torch.ops.gru_fused.gru_forward

    class Counting:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return original(*args)

    monkeypatch.setattr(torch.ops.gru_fused, "gru_forward", Counting())
    return calls


def test_vmap_over_inputs_is_one_batched_call(monkeypatch):
    """Over inputs (weights shared) the vmapped dimension joins the batch: one op call,
    no per-sample fallback (which would warn)."""
    _, m = pair()
    x = torch.randn(4, 5, 2, 3, dtype=torch.float64)  # [N, T, B, I]
    want = torch.stack([m(xi)[0] for xi in x])
    calls = _count_forward_calls(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "There is a performance drop ... batching rule"
        got = torch.func.vmap(lambda xi: m(xi)[0])(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert calls == [torch.Size([5, 8, 3])]


def test_vmap_over_inputs_states_and_lengths():
    T, B, I, H = 5, 3, 2, 4
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(3 * H, I, generator=g, dtype=torch.float64),
         torch.randn(3 * H, H, generator=g, dtype=torch.float64),
         torch.randn(3 * H, generator=g, dtype=torch.float64),
         torch.randn(3 * H, generator=g, dtype=torch.float64)]
    x = torch.randn(T, 6, B, I, generator=g, dtype=torch.float64)  # vmapped over dim 1
    h = torch.randn(6, B, H, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B, 6), generator=g)  # vmapped over dim 1

    def f(x, h, lens):
        return gru_fused.gru(x, h, *w, reverse=True, lengths=lens)

    got = torch.func.vmap(f, in_dims=(1, 0, 1))(x, h, lengths)
    for i in range(6):
        want = f(x[:, i], h[i], lengths[:, i])
        torch.testing.assert_close(got[0][i], want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1][i], want[1], rtol=1e-12, atol=1e-12)


def test_vmap_over_weights_and_of_gradients():
    """Ensembles (stacked weights) and per-sample gradients."""
    models = [pair()[1] for _ in range(3)]
    for i, mod in enumerate(models):
        with torch.no_grad():
            for p in mod.parameters():
                p.mul_(1 + 0.1 * i)
    params, _ = torch.func.stack_module_state(models)
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def run(p, x):
        return functional_call(models[0], p, (x,))[0]

    got = torch.func.vmap(run, in_dims=(0, None))(params, x)
    for i, mod in enumerate(models):
        torch.testing.assert_close(got[i], mod(x)[0], rtol=1e-12, atol=1e-12)

    def loss(p, xi):
        return run(p, xi.unsqueeze(1)).pow(2).sum()

    p0 = {k: v.detach() for k, v in models[0].named_parameters()}
    xs = torch.randn(4, 5, 3, dtype=torch.float64)  # 4 samples of [T, I]
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(p0, xs)
    for i in range(4):
        want = torch.func.grad(loss)(p0, xs[i])
        for k in want:
            torch.testing.assert_close(per_sample[k][i], want[k], rtol=1e-10, atol=1e-12)


# --- autocast ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["bf16_input", "f32_input", "bf16_input_f32_hx"])
def test_cpu_autocast_follows_nn_gru(case):
    ref, m = pair(dtype=torch.float32)
    x = torch.randn(5, 2, 3)
    args = {"bf16_input": (x.bfloat16(),), "f32_input": (x,),
            "bf16_input_f32_hx": (x.bfloat16(), torch.randn(1, 2, 4))}[case]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_h = ref(*args)
        got, got_h = m(*args)
    assert got.dtype == want.dtype and got_h.dtype == want_h.dtype
    # nn.GRU's matmuls ran in bfloat16 (each op autocasts); FusedGRU computes in the
    # dtype nn.GRU returns: bfloat16 error at most.
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    if case == "f32_input":
        torch.testing.assert_close(got, m(x)[0], rtol=0, atol=0)  # float32 throughout
    got.float().sum().backward()
    assert m.weight_hh_l0.grad.dtype == torch.float32
    assert torch.isfinite(m.weight_hh_l0.grad).all()


def test_bf16_input_outside_autocast_still_raises_as_nn_gru():
    ref, m = pair(dtype=torch.float32)
    x = torch.randn(5, 2, 3).bfloat16()
    for mod in (ref, m):
        with pytest.raises(ValueError, match="input dtype"):
            mod(x)


def test_cuda_autocast_follows_nn_gru(cuda_device):
    for dtype in (torch.float16, torch.bfloat16):
        ref, m = pair(dtype=torch.float32)
        ref, m = ref.to(cuda_device), m.to(cuda_device)
        x = torch.randn(5, 2, 3, device=cuda_device)
        with torch.autocast("cuda", dtype=dtype):
            want = ref(x)[0]
            got = m(x)[0]
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


# --- jit.trace, quantization, export ------------------------------------------------------------

def test_jit_trace_with_its_default_check():
    _, m = pair(dtype=torch.float32)
    x = torch.randn(5, 2, 3)
    traced = torch.jit.trace(m, (x,))  # check_trace=True: a second trace must agree
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for g, w in zip(traced(x), m(x)):
                torch.testing.assert_close(g, w)
    traced(x)[0].sum().backward()
    assert m.weight_ih_l0.grad is not None


def test_quantize_dynamic_named_fused_gru():
    torch.manual_seed(0)
    model = nn.Sequential(gru_fused.FusedGRU(3, 8, num_layers=2, bidirectional=True))
    ref = nn.Sequential(nn.GRU(3, 8, num_layers=2, bidirectional=True))
    ref.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        q = torch.ao.quantization.quantize_dynamic(model, {gru_fused.FusedGRU}, dtype=torch.qint8)
        q_ref = torch.ao.quantization.quantize_dynamic(ref, {nn.GRU}, dtype=torch.qint8)
    assert isinstance(q[0], torch.ao.nn.quantized.dynamic.GRU)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(q[0](x)[0], q_ref[0](x)[0])  # the same int8 GRU
    assert isinstance(model[0], gru_fused.FusedGRU)  # not inplace: the float model stays


def test_quantize_dynamic_refuses_reset_before():
    model = nn.Sequential(gru_fused.FusedGRU(3, 8, reset_after=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="reset_after=False"):
            torch.ao.quantization.quantize_dynamic(model, {gru_fused.FusedGRU})


@pytest.mark.parametrize("training", [False, True])
def test_export_captures_the_inference_op_in_eval(training, tmp_path):
    _, m = pair(dtype=torch.float32, num_layers=2)
    m.train(training)
    x = torch.randn(5, 2, 3)
    program = torch.export.export(m, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    want = "gru_fused.gru_forward.default" if training else "gru_fused.gru_inference.default"
    other = "gru_fused.gru_inference.default" if training else "gru_fused.gru_forward.default"
    assert want in targets and other not in targets, targets
    path = tmp_path / "gru.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)  # needs `import gru_fused` (done above)
    for g, w in zip(loaded.module()(x), m(x)):
        torch.testing.assert_close(g, w)


def test_vmap_bench_smoke(capsys):
    """benchmarks/vmap_bench.py runs (its rule and fallback are checked equal) and prints
    its table."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vmap_bench.py"
    spec = importlib.util.spec_from_file_location("vmap_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--samples", "2", "--min-run-time", "0.01"])
    table = capsys.readouterr().out
    assert table.count("| forward") == 2 and "per-sample weight gradients" in table
