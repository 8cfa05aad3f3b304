"""The sync-free training step (gru_fused.train.TrainStep) against the book's loop: the
same parameters and losses, clipping active or not, sequential or random minibatches;
no tensor read back to Python inside a step; --compile and --cuda-graphs."""
import random

import pytest
import torch

from gru_fused import data, train

# Small and quick: 1000 tokens in minibatches of 8 x 10 give 12 minibatches per epoch.
BATCH, STEPS, TOKENS, HIDDEN, EPOCHS = 8, 10, 1000, 16, 2
# The gradient norms of these runs lie between 0.09 and 0.34 (H=16, seed 0): the book's
# theta = 1 never clips, 0.05 clips every step. Both are asserted, not assumed.
THETA_INACTIVE, THETA_ACTIVE = 1.0, 0.05


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as in test_train.py: tiny steps on a small, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(impl, mode, text_path, use_random_iter=False, theta=1.0, device="cpu",
         epochs=EPOCHS, record_norms=False):
    """Seeded training: (parameters after it, per-minibatch losses, history, norms), the
    norms being every gradient norm the clipping computed if record_norms (reading them
    synchronises, so not in a CUDA graph)."""
    train_iter, vocab = data.load_data_time_machine(BATCH, STEPS, use_random_iter, TOKENS,
                                                    text_path)
    net = train.make_net(impl, len(vocab), HIDDEN, device, seed=0)
    random.seed(0)  # the iterators' offsets and shuffles
    norms, losses = [], []
    grad_norm = train.grad_norm

    def recording_norm(params):
        norm = grad_norm(params)
        norms.append(norm.item())
        return norm

    mp = pytest.MonkeyPatch()
    if record_norms:
        mp.setattr(train, "grad_norm", recording_norm)
    try:
        history = train.train(net, train_iter, vocab, lr=1.0, num_epochs=epochs,
                              device=device, use_random_iter=use_random_iter,
                              progress=False, step_losses=losses, mode=mode, theta=theta)
    finally:
        mp.undo()
    params = [p.detach().cpu().clone() for p in train.trainable_params(net)]
    return params, losses, history, norms


@pytest.mark.parametrize("use_random_iter", [False, True], ids=["sequential", "random"])
@pytest.mark.parametrize("clipping", ["inactive", "active"])
@pytest.mark.parametrize("impl", ["fused", "fused_scratch"])
def test_sync_free_step_equals_book_step(impl, clipping, use_random_iter, text_path):
    """Eager TrainStep against train_epoch: 24 minibatches (2 epochs, so the state is
    started afresh once more), both model kinds (torch.optim.SGD; d2l.sgd on a list).
    The same bits: both clip with the same norm and the same factor, or multiply by
    exactly 1, and sum the loss in float64 in the same order."""
    theta = THETA_ACTIVE if clipping == "active" else THETA_INACTIVE
    book_params, book_losses, book, book_norms = _run(impl, "book", text_path,
                                                      use_random_iter, theta,
                                                      record_norms=True)
    params, losses, history, norms = _run(impl, "eager", text_path, use_random_iter, theta,
                                          record_norms=True)

    assert len(book_norms) == len(norms) == len(losses) == 24
    if clipping == "active":
        assert min(book_norms) > theta
    else:
        assert max(book_norms) <= theta
    assert history["mode"] == "eager" and book["mode"] == "book"
    assert losses == book_losses
    assert history["perplexity"] == book["perplexity"]
    for p, q in zip(params, book_params, strict=True):
        assert torch.equal(p, q)


def test_clip_gradients_is_the_book_rule():
    """clip_gradients scales like grad_clipping above theta, leaves the gradients exactly
    as they are at or below it, and at a zero norm (theta / 0 = inf) too."""
    def grads(value):
        return [torch.full((3,), value), torch.full((4,), value)]  # norm value * sqrt(7)

    for value, theta in [(2.0, 1.0), (2.0, 5.3), (0.0, 1.0), (1e-3, 1.0)]:
        params = [torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)]
        book = [torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)]
        for p, q, g in zip(params, book, grads(value)):
            p.grad, q.grad = g.clone(), g.clone()

        class Net:
            pass

        net = Net()
        net.params = book
        train.grad_clipping(net, theta)
        train.clip_gradients(params, theta)
        for p, q, g in zip(params, book, grads(value)):
            assert torch.equal(p.grad, q.grad)
            if value * 7 ** 0.5 <= theta:
                assert torch.equal(p.grad, g)
        expected = min(value * 7 ** 0.5, theta)
        torch.testing.assert_close(train.grad_norm(params), torch.tensor(expected))


def test_step_reads_nothing_back(text_path, monkeypatch):
    """Inside a step no tensor becomes a Python value (`if norm > theta`, float(l),
    .item(), .tolist()): each would make the host wait for a GPU."""
    train_iter, vocab = data.load_data_time_machine(BATCH, STEPS, False, TOKENS, text_path)
    for impl in ("fused", "fused_scratch"):
        net = train.make_net(impl, len(vocab), HIDDEN, "cpu", seed=0)
        if impl == "fused":
            update = torch.optim.SGD(net.parameters(), 1.0).step
        else:
            def update():
                train.sgd(net.params, 1.0, 1)
        step = train.TrainStep(net, torch.nn.CrossEntropyLoss(), update, BATCH, STEPS, "cpu")
        X, Y = next(iter(train_iter))
        step.X.copy_(X)
        step.y.copy_(Y.T.reshape(-1))
        before = [p.detach().clone() for p in step.params]

        with monkeypatch.context() as m:
            for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
                def refuse(*args, name=name, **kwargs):
                    raise AssertionError(f"Tensor.{name} called inside the step")
                m.setattr(torch.Tensor, name, refuse)
            step.run()
            step.run()
        # The step did train: parameters moved and the loss sum holds two minibatches.
        assert any(not torch.equal(p, b) for p, b in zip(step.params, before))
        assert 2 * BATCH * STEPS * 2.0 < step.total_loss.item() < 2 * BATCH * STEPS * 4.0


def test_cuda_graphs_on_cpu_fall_back_to_eager(text_path, capsys):
    """--cuda-graphs where there is no CUDA device: a message on stderr, then the eager
    sync-free step, with its results."""
    params, losses, history, _ = _run("fused", "cuda-graphs", text_path, epochs=1)
    assert history["mode"] == "eager"
    err = capsys.readouterr().err
    assert "--cuda-graphs: CUDA graphs need a CUDA device" in err and "eagerly" in err
    eager_params, eager_losses, _, _ = _run("fused", "eager", text_path, epochs=1)
    assert losses == eager_losses
    assert all(torch.equal(p, q) for p, q in zip(params, eager_params, strict=True))


def test_compile_matches_eager(tmp_path, text_path):
    """--compile through the command line: it compiles (before the timed epochs) and the
    perplexity follows eager's within 1% over 3 epochs."""
    records = {}
    for flag in ([], ["--compile"]):
        records[bool(flag)] = train.main(
            ["--impl", "fused", "--epochs", "3", "--hidden", str(HIDDEN), "--batch-size",
             str(BATCH), "--num-steps", str(STEPS), "--max-tokens", str(TOKENS),
             "--device", "cpu", "--sample-every", "0", "--no-progress",
             "--data", str(text_path), "--out", str(tmp_path), *flag])
    eager, compiled = records[False], records[True]
    assert eager["mode_run"] == "eager" and compiled["mode_run"] == "compile"
    assert compiled["setup_seconds"] > 0
    torch.testing.assert_close(torch.tensor(compiled["history"]["perplexity"]),
                               torch.tensor(eager["history"]["perplexity"]),
                               rtol=0.01, atol=0)
    assert compiled["history"]["perplexity"][-1] < compiled["history"]["perplexity"][0]


@pytest.mark.parametrize("impl", ["fused", "fused_scratch", "scratch"])
def test_cuda_graph_replay_equals_eager_cuda(impl, cuda_device, text_path):
    """The captured step, replayed for every minibatch (2 epochs: a fresh state at each
    epoch's start), against the same step run eagerly and the book's loop on the GPU."""
    params, losses, history, _ = _run(impl, "cuda-graphs", text_path, device=cuda_device)
    eager_params, eager_losses, _, _ = _run(impl, "eager", text_path, device=cuda_device)
    book_params, _, _, _ = _run(impl, "book", text_path, device=cuda_device)
    assert history["mode"] == "cuda-graphs"
    # The same kernels on the same data; rtol allows a different cuBLAS algorithm.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses),
                               rtol=1e-5, atol=0)
    for p, q, b in zip(params, eager_params, book_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, b, rtol=1e-5, atol=1e-6)


def test_eager_step_never_synchronises_cuda(cuda_device, text_path):
    """On the GPU the eager step makes no synchronising call (CUDA's sync debug mode
    turns one into an error): only the epoch's one read of the loss sum does."""
    train_iter, vocab = data.load_data_time_machine(BATCH, STEPS, False, TOKENS, text_path)
    net = train.make_net("fused", len(vocab), HIDDEN, cuda_device, seed=0)
    step = train.TrainStep(net, torch.nn.CrossEntropyLoss(),
                           torch.optim.SGD(net.parameters(), 1.0).step, BATCH, STEPS,
                           cuda_device)
    Xs, ys = train.device_batches(train_iter, cuda_device)
    step.run()  # first call: lazy initialisation (cuBLAS handles) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for X, y in zip(Xs, ys):
            step.X.copy_(X)
            step.y.copy_(y)
            step.run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(step.total_loss).item()


# Last in the file (and gpu_check.sh runs this file last): a capture that fails on purpose
# can leave PyTorch's caching allocator believing a capture is still under way (seen in
# some torch versions), which would break any capture after it.
def test_cuda_graphs_fall_back_when_capture_fails_cuda(cuda_device, text_path, capsys,
                                                      monkeypatch):
    """A step that cannot be captured (here: clipping that reads the norm back, as the
    book's does) is reported on stderr and trained eagerly, with eager's results."""
    def clip_on_the_host(params, theta):
        norm = train.grad_norm(params)
        if norm > theta:  # a synchronisation: not allowed while capturing
            for p in params:
                p.grad *= theta / norm

    monkeypatch.setattr(train, "clip_gradients", clip_on_the_host)
    params, losses, history, _ = _run("fused", "cuda-graphs", text_path, device=cuda_device,
                                      epochs=1)
    assert history["mode"] == "eager"
    assert "--cuda-graphs: capturing the step failed: " in capsys.readouterr().err
    monkeypatch.undo()
    eager_params, eager_losses, _, _ = _run("fused", "eager", text_path, device=cuda_device,
                                            epochs=1)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses),
                               rtol=1e-5, atol=0)
    for p, q in zip(params, eager_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
