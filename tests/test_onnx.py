"""ONNX export: ``torch.onnx.export(..., dynamo=True)`` of a FusedGRU (or of gru_fused.gru)
gives one standard ONNX ``GRU`` node per layer and direction, which onnxruntime runs with
PyTorch's outputs.

Needs the optional packages onnx, onnxscript (the exporter) and onnxruntime; the module
is skipped without them. Each export takes a few seconds, so the configurations are a
covering subset: every switch (layers, bidirectional, reset_after, bias, batch_first, h0)
takes both values somewhere.
"""
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import gru_fused  # noqa: E402

# The exporter warns that an axis name is not used when two inputs share one Dim.
pytestmark = pytest.mark.filterwarnings("ignore:.*axis name.*:UserWarning")

I, H = 5, 6
# Ops that would mean the recurrence was unrolled or looped instead of one GRU node.
HEAVY = {"Loop", "Scan", "If", "RNN", "LSTM", "MatMul", "Gemm"}


def _nodes(model):
    """Every node of the model: the main graph, subgraphs (attributes) and functions."""
    def walk(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)

    yield from walk(model.graph)
    for function in model.functions:
        for node in function.node:
            yield node


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _export(module, args, path, dynamic_shapes=None):
    torch.onnx.export(module, args, str(path), dynamo=True, verbose=False,
                      dynamic_shapes=dynamic_shapes)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return model, session


def _run(session, *tensors):
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(tensors), names
    feed = {n: t.detach().numpy() for n, t in zip(names, tensors)}
    return [torch.from_numpy(y) for y in session.run(None, feed)]


def _check_gru_nodes(model, count, reset_after, directions):
    """Exactly `count` standard GRU nodes with the right attributes, and nothing heavy."""
    nodes = list(_nodes(model))
    grus = [n for n in nodes if n.op_type == "GRU"]
    assert len(grus) == count, [n.op_type for n in nodes]
    heavy = sorted({n.op_type for n in nodes} & HEAVY)
    assert not heavy, heavy
    assert sorted(_attrs(n)["direction"].decode() for n in grus) == sorted(directions)
    for node in grus:
        assert node.domain in ("", "ai.onnx")
        attrs = _attrs(node)
        assert attrs["hidden_size"] == H
        assert attrs["linear_before_reset"] == (1 if reset_after else 0)
    assert any(o.domain in ("", "ai.onnx") and o.version >= 14 for o in model.opset_import)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# (num_layers, bidirectional, reset_after, bias, batch_first, with_h0): each switch takes
# both values; the formula is crossed with layers and directions.
MODULE_CASES = [
    (1, False, True, True, False, False),
    (1, False, False, False, True, True),
    (1, True, False, False, False, True),
    (2, False, True, False, True, False),
    (2, True, True, True, True, True),
    (2, True, False, True, False, False),
]


@pytest.mark.parametrize(
    "num_layers,bidirectional,reset_after,bias,batch_first,with_h0", MODULE_CASES,
    ids=[f"L{c[0]}-{'bi' if c[1] else 'uni'}-{'after' if c[2] else 'before'}-"
         f"{'bias' if c[3] else 'nobias'}-{'bf' if c[4] else 'tf'}-{'h0' if c[5] else 'noh0'}"
         for c in MODULE_CASES])
def test_export_fused_gru(tmp_path, num_layers, bidirectional, reset_after, bias,
                          batch_first, with_h0):
    torch.manual_seed(0)
    gru = gru_fused.FusedGRU(I, H, num_layers=num_layers, bidirectional=bidirectional,
                             bias=bias, batch_first=batch_first,
                             reset_after=reset_after).eval()
    if bias:  # nn.GRU's initialisation gives small biases: make them matter
        with torch.no_grad():
            for name, p in gru.named_parameters():
                if name.startswith("bias"):
                    p.uniform_(-1, 1)
    D = 2 if bidirectional else 1
    T, B = 7, 3
    x = torch.randn(B, T, I) if batch_first else torch.randn(T, B, I)
    args = (x, torch.randn(num_layers * D, B, H)) if with_h0 else (x,)

    model, session = _export(gru, args, tmp_path / "gru.onnx")
    _check_gru_nodes(model, num_layers * D, reset_after,
                     ["forward", "reverse"] * num_layers if bidirectional
                     else ["forward"] * num_layers)

    with torch.no_grad():
        expected = gru(*args)
    output, h_n = _run(session, *args)
    _close(output, expected[0])
    _close(h_n, expected[1])


def test_export_dynamic_shapes(tmp_path):
    """Batch and sequence length left symbolic: one exported model runs other shapes."""
    torch.manual_seed(1)
    gru = gru_fused.FusedGRU(I, H, num_layers=2, bidirectional=True, batch_first=True,
                             reset_after=False).eval()
    batch, steps = torch.export.Dim("batch"), torch.export.Dim("steps")
    x, h0 = torch.randn(3, 7, I), torch.randn(4, 3, H)
    model, session = _export(gru, (x, h0), tmp_path / "dyn.onnx",
                             dynamic_shapes=({0: batch, 1: steps}, {1: batch}))
    _check_gru_nodes(model, 4, False, ["forward", "reverse"] * 2)
    for B, T in [(3, 7), (5, 2), (1, 11)]:
        x, h0 = torch.randn(B, T, I), torch.randn(4, B, H)
        with torch.no_grad():
            expected = gru(x, h0)
        output, h_n = _run(session, x, h0)
        assert output.shape == (B, T, 2 * H)
        _close(output, expected[0])
        _close(h_n, expected[1])


class _Layer(torch.nn.Module):
    """One gru_fused.gru call, lengths an input of the exported graph."""

    def __init__(self, reset_after, reverse, with_h0):
        super().__init__()
        self.weight_ih = torch.nn.Parameter(torch.randn(3 * H, I) * 0.5)
        self.weight_hh = torch.nn.Parameter(torch.randn(3 * H, H) * 0.5)
        self.bias_ih = torch.nn.Parameter(torch.randn(3 * H) * 0.5)
        self.bias_hh = torch.nn.Parameter(torch.randn(3 * H) * 0.5)
        self.reset_after, self.reverse, self.with_h0 = reset_after, reverse, with_h0

    def forward(self, x, hx, lengths):
        return gru_fused.gru(x, hx if self.with_h0 else None, self.weight_ih,
                             self.weight_hh, self.bias_ih, self.bias_hh,
                             reset_after=self.reset_after, reverse=self.reverse,
                             lengths=lengths)


@pytest.mark.parametrize("reset_after,reverse,with_h0", [
    (True, False, True), (False, True, True), (True, True, False)],
    ids=["after-forward-h0", "before-reverse-h0", "after-reverse-noh0"])
def test_export_lengths(tmp_path, reset_after, reverse, with_h0):
    """Padded steps: ONNX's GRU writes zeros there, gru_fused carries the state (the final
    state forward, the initial state reverse); the exported graph must give gru_fused's
    values, also for a sequence of length 0 (h_n = hx)."""
    torch.manual_seed(2)
    layer = _Layer(reset_after, reverse, with_h0).eval()
    batch, steps = torch.export.Dim("batch"), torch.export.Dim("steps")
    T, B = 6, 4
    args = (torch.randn(T, B, I), torch.randn(B, H), torch.tensor([6, 2, 0, 3]))
    model, session = _export(layer, args, tmp_path / "lengths.onnx",
                             dynamic_shapes=({0: steps, 1: batch}, {0: batch}, {0: batch}))
    _check_gru_nodes(model, 1, reset_after, ["reverse" if reverse else "forward"])
    gru = next(n for n in _nodes(model) if n.op_type == "GRU")
    assert gru.input[4] != "", "sequence_lens should be wired"

    for x, hx, lengths in [args,
                           (torch.randn(5, 3, I), torch.randn(3, H), torch.tensor([1, 5, 4])),
                           (torch.randn(3, 2, I), torch.randn(2, H), torch.tensor([0, 0]))]:
        with torch.no_grad():
            expected = layer(x, hx, lengths)
        output, h_n = _run(session, x, hx, lengths)
        # The comparison means something: the padded steps hold non-zero states.
        pad = torch.arange(x.shape[0]).unsqueeze(1) >= lengths.unsqueeze(0)
        if with_h0 or not reverse:
            assert (expected[0][pad].abs().sum(-1) > 0).all()
        _close(output, expected[0])
        _close(h_n, expected[1])


def test_export_leaves_other_threads_eager(tmp_path):
    """The export flags (torch.onnx.is_in_onnx_export, torch.compiler.is_exporting) are
    process-wide: a FusedGRU running eagerly in another thread during an export must still
    compute, not return the symbolic op's placeholder zeros."""
    import threading

    torch.manual_seed(3)
    gru = gru_fused.FusedGRU(I, H).eval()
    x = torch.randn(4, 2, I)
    with torch.no_grad():
        expected = gru(x)[0]
    done = threading.Event()
    calls, wrong, errors = [0], [0], []

    def eager():
        while not done.is_set():
            try:
                with torch.no_grad():
                    output = gru(x)[0]
            except Exception as e:  # e.g. the tracer's state reached from this thread
                errors.append(repr(e))
                return
            calls[0] += 1
            wrong[0] += not torch.equal(output, expected)

    thread = threading.Thread(target=eager)
    thread.start()
    try:
        _export(gru_fused.FusedGRU(I, H).eval(), (x,), tmp_path / "other.onnx")
    finally:
        done.set()
        thread.join()
    assert not errors, errors
    assert calls[0] > 0
    assert wrong[0] == 0, f"{wrong[0]} of {calls[0]} eager calls got placeholder outputs"
