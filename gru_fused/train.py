"""The book's GRU language model on The Time Machine, with four interchangeable GRUs.

"Dive into Deep Learning", section "Gated Recurrent Units": a character-level model
(one-hot input -> GRU -> linear output), cross-entropy, SGD with lr 1, gradient
clipping to norm 1, sequential minibatches with the state carried (and detached) from
one minibatch to the next, perplexity per epoch and greedy generation after a prefix.
The loop here is the book's train_ch8 / train_epoch_ch8 / predict_ch8 / grad_clipping.

Implementations (--impl):

    scratch        the book's from-scratch Python GRU (gru_fused.reference.d2l_gru)
    fused_scratch  the same functions, the loop replaced by the fused op (gru_fused.scratch.gru)
    nn             torch.nn.GRU inside the book's RNNModel
    fused          gru_fused.FusedGRU inside the book's RNNModel

The same --seed gives the same initial weights to nn and fused (both use nn.GRU's
initialisation and parameter order, then the output layer's) and to scratch and
fused_scratch (both use gru_fused.scratch.get_params), and the same minibatches to all.

Training modes (--mode; --compile and --cuda-graphs are short for the last two):

    book         the book's train_epoch_ch8: per minibatch the host reads the gradient
                 norm back (`if norm > theta`) and the loss (`float(l)`); the reference
    eager        the sync-free step (TrainStep), default: clipping scales on the device,
                 the loss is summed on the device and read once per epoch, the epoch's
                 minibatches go to the device in one copy; the same numbers as book
    compile      eager with the model and the loss under torch.compile
    cuda-graphs  eager with the whole step captured once as a CUDA graph and replayed for
                 every minibatch (falls back to eager, saying why, where it cannot)

    python -m gru_fused.train --impl fused --epochs 500
    python -m gru_fused.train --impl fused --device cuda --cuda-graphs
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from . import data as tm_data

IMPLS = ("scratch", "fused_scratch", "nn", "fused")
MODES = ("book", "eager", "compile", "cuda-graphs")
PREFIXES = ("time traveller", "traveller")
NUM_PREDS = 50


def _train_extra(module: str):
    """Imports module, one of the `train` extra's packages (tqdm, matplotlib): the kernel
    library does not need them, so they are imported only where used, and their absence
    says how to get them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"gru_fused.train needs {module.split('.')[0]}, which is not installed: it comes "
            f"with gru_fused's `train` extra, pip install \"gru_fused[train]\" (or, in a "
            f"checkout, pip install --no-build-isolation -e \".[train]\"), or pip install "
            f"tqdm matplotlib") from e


# --- The book's models ----------------------------------------------------------------

class RNNModelScratch:
    """d2l.RNNModelScratch: parameters from get_params, the step loop in forward_fn."""

    def __init__(self, vocab_size: int, num_hiddens: int, device, get_params: Callable,
                 init_state: Callable, forward_fn: Callable):
        self.vocab_size, self.num_hiddens = vocab_size, num_hiddens
        self.params = get_params(vocab_size, num_hiddens, device)
        self.init_state, self.forward_fn = init_state, forward_fn

    def __call__(self, X, state):
        # X [B, T] token indices -> one-hot [T, B, V].
        X = F.one_hot(X.T.long(), self.vocab_size).float()
        return self.forward_fn(X, state, self.params)

    def begin_state(self, batch_size: int, device):
        return self.init_state(batch_size, self.num_hiddens, device)

    def parameters(self):
        return iter(self.params)


class RNNModel(nn.Module):
    """d2l.RNNModel for a single-direction GRU layer: one-hot -> rnn -> Linear(H, V)."""

    def __init__(self, rnn_layer: nn.Module, vocab_size: int):
        super().__init__()
        self.rnn = rnn_layer
        self.vocab_size = vocab_size
        self.num_hiddens = self.rnn.hidden_size
        self.num_directions = 2 if self.rnn.bidirectional else 1
        self.linear = nn.Linear(self.num_hiddens * self.num_directions, self.vocab_size)

    def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size).float()  # [T, B, V]
        Y, state = self.rnn(X, state)  # Y [T, B, H]
        # [T * B, V]: row t * B + b is step t of sequence b, matching Y.T.reshape(-1) labels.
        output = self.linear(Y.reshape((-1, Y.shape[-1])))
        return output, state

    def begin_state(self, device, batch_size: int = 1):
        return torch.zeros((self.num_directions * self.rnn.num_layers, batch_size,
                            self.num_hiddens), device=device)


def make_net(impl: str, vocab_size: int, num_hiddens: int, device, seed: Optional[int] = None):
    """The book's network for one implementation; seed, if given, is set just before
    the parameters are created, so equal seeds give equal weights where formulas agree."""
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}: expected one of {', '.join(IMPLS)}")
    if impl.startswith("fused") and torch.device(device).type == "cuda":
        from .ops import cuda_compiled
        if not cuda_compiled():
            raise RuntimeError(f"--impl {impl} on {device}: this build of gru_fused has no "
                               "CUDA kernels; rebuild it with CUDA, or use --device cpu")
    if seed is not None:
        torch.manual_seed(seed)
    if impl in ("scratch", "fused_scratch"):
        from . import reference, scratch
        forward_fn = reference.d2l_gru if impl == "scratch" else scratch.gru
        return RNNModelScratch(vocab_size, num_hiddens, device, scratch.get_params,
                               scratch.init_gru_state, forward_fn)
    if impl == "nn":
        layer = nn.GRU(vocab_size, num_hiddens)
    else:
        from .module import FusedGRU
        layer = FusedGRU(vocab_size, num_hiddens)
    return RNNModel(layer, vocab_size).to(device)


# --- The book's training loop -----------------------------------------------------------

def sgd(params: Sequence[torch.Tensor], lr: float, batch_size: int) -> None:
    """d2l.sgd: minibatch stochastic gradient descent on leaf tensors."""
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


def trainable_params(net) -> List[torch.Tensor]:
    """What SGD updates: a module's parameters that require grad, or the scratch model's."""
    if isinstance(net, nn.Module):
        return [p for p in net.parameters() if p.requires_grad]
    return list(net.params)


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global norm of the gradients, a 0-dim tensor on their device. The book's
    formula and summation order, shared by both clipping rules so they see the same bits."""
    return torch.sqrt(sum(torch.sum((p.grad ** 2)) for p in params))


def grad_clipping(net, theta: float) -> None:
    """d2l.grad_clipping: rescale all gradients together so their global norm is <= theta.
    `norm > theta` reads the norm back to the host: one synchronisation per minibatch."""
    params = trainable_params(net)
    norm = grad_norm(params)
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


def clip_gradients(params: Sequence[torch.Tensor], theta: float) -> None:
    """grad_clipping's rule decided on the device: every gradient times theta / norm where
    norm > theta, else times 1; that is min(1, theta / norm), and 1 for a NaN norm, as the
    book's comparison. Where the book scales, the factor is the book's expression
    theta / norm, so the gradients come out the same bits; elsewhere they are multiplied
    by exactly 1 (also at norm 0, where theta / norm is inf)."""
    norm = grad_norm(params)
    scale = torch.where(norm > theta, theta / norm, 1.0)  # 0-dim, on the device
    torch._foreach_mul_([p.grad for p in params], scale)


def predict(prefix: str, num_preds: int, net, vocab, device) -> str:
    """d2l.predict_ch8: warm the state up on prefix, then append num_preds argmax tokens."""
    with torch.no_grad():
        state = net.begin_state(batch_size=1, device=device)
        outputs = [vocab[prefix[0]]]

        def get_input():
            return torch.tensor([outputs[-1]], device=device).reshape((1, 1))

        for y in prefix[1:]:
            _, state = net(get_input(), state)
            outputs.append(vocab[y])
        for _ in range(num_preds):
            y, state = net(get_input(), state)
            outputs.append(int(y.argmax(dim=1).reshape(1)))
    return "".join([vocab.idx_to_token[i] for i in outputs])


NO_MINIBATCH = ("the corpus gave no minibatch: it is shorter than one minibatch of "
                "batch_size x num_steps tokens (see minibatch_problem)")


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(net, train_iter, loss, updater, device, use_random_iter: bool,
                step_losses: Optional[List[float]] = None, theta: float = 1):
    """d2l.train_epoch_ch8: one pass over train_iter, gradients clipped to norm theta.

    Returns (perplexity, tokens/sec, tokens, seconds): the book's two numbers,
    exp(total loss / total tokens) and the tokens processed over the wall time of the
    whole epoch loop, then that count and time. The loss of every minibatch is appended
    to step_losses when it is given.
    """
    state = None
    total_loss, total_tokens = 0.0, 0
    start = time.perf_counter()
    for X, Y in train_iter:
        if state is None or use_random_iter:
            # Random minibatches are not adjacent in the text: start from zeros.
            state = net.begin_state(batch_size=X.shape[0], device=device)
        else:
            # Keep the state's value but cut the graph, so backward stops at this minibatch.
            if isinstance(net, nn.Module) and not isinstance(state, tuple):
                state.detach_()
            else:
                for s in state:
                    s.detach_()
        y = Y.T.reshape(-1)  # [T * B], time-major like the model's output rows
        X, y = X.to(device), y.to(device)
        y_hat, state = net(X, state)
        l = loss(y_hat, y.long()).mean()
        if isinstance(updater, torch.optim.Optimizer):
            updater.zero_grad()
            l.backward()
            grad_clipping(net, theta)
            updater.step()
        else:
            l.backward()
            grad_clipping(net, theta)
            # The loss is already a mean, hence batch_size=1.
            updater(batch_size=1)
        l_value = l.detach().item()  # synchronises, as the book's Accumulator does
        if step_losses is not None:
            step_losses.append(l_value)
        total_loss += l_value * y.numel()
        total_tokens += y.numel()
    if total_tokens == 0:
        raise ValueError(NO_MINIBATCH)
    _synchronize(device)
    elapsed = time.perf_counter() - start
    return math.exp(total_loss / total_tokens), total_tokens / elapsed, total_tokens, elapsed


# --- The same step without host synchronisation ----------------------------------------

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def state_tensors(state: State) -> Tuple[torch.Tensor, ...]:
    """The tensors of a model's state: RNNModel's [1, B, H] tensor, or the scratch
    model's tuple of [B, H]."""
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


class TrainStep:
    """One minibatch of the book's recipe (forward, loss, backward, clipping, update,
    state carried) that never makes the host wait for the device, run on static buffers so
    that one code path serves eagerly, under torch.compile and as a replayed CUDA graph.

    Buffers, on the device; the caller fills X and y, then calls run():
        X [B, T] int64 token indices;
        y [T * B] int64 labels, time-major like the model's output rows (Y.T.reshape(-1));
        state: the model's begin_state, carried from one step to the next (the book's
            detach_, done by copying the new state into it);
        total_loss [] float64: the sum over steps of mean loss x tokens, as the book's
            Accumulator sums it (float32 loss, float64 sum), read once per epoch;
        loss [] float32: the last step's mean loss.

    update() is the book's parameter update (torch.optim.SGD.step, or d2l.sgd for the
    scratch model); it must keep no state of its own, since warm_up runs steps and then
    puts only the parameters back.
    """

    def __init__(self, net, loss: Callable, update: Callable[[], None], batch_size: int,
                 num_steps: int, device, theta: float = 1):
        self.net, self.loss_fn, self.update, self.theta = net, loss, update, theta
        self.params = trainable_params(net)
        device = torch.device(device)
        self.X = torch.zeros(batch_size, num_steps, dtype=torch.long, device=device)
        self.y = torch.zeros(num_steps * batch_size, dtype=torch.long, device=device)
        self.state = net.begin_state(batch_size=batch_size, device=device)
        self.total_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.loss = torch.zeros((), device=device)
        self.run: Callable[[], None] = self.step  # replaced by a graph's replay
        self.graph = None

    def forward_loss(self, X: torch.Tensor, y: torch.Tensor, state: State):
        """(mean loss [], new state): the model and the loss, what --compile compiles."""
        y_hat, state = self.net(X, state)  # y_hat [T * B, V]
        return self.loss_fn(y_hat, y).mean(), state

    def zero_grad(self) -> None:
        """No gradients: backward then writes fresh ones (in a CUDA graph's memory pool
        when captured), as optimizer.zero_grad() does by default."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """One minibatch, eagerly: what run() does until capture() replaces it."""
        self.zero_grad()
        l, state = self.forward_loss(self.X, self.y, self.state)
        l.backward()
        with torch.no_grad():
            clip_gradients(self.params, self.theta)
            self.update()
            for s, new in zip(state_tensors(self.state), state_tensors(state), strict=True):
                s.copy_(new)
            self.loss.copy_(l)
            self.total_loss += self.loss.double() * self.y.numel()

    def reset_state(self) -> None:
        """The state begin_state gives (zeros): at an epoch's start, and before every
        random minibatch."""
        for s in state_tensors(self.state):
            s.zero_()

    def warm_up(self, steps: int = 3) -> None:
        """Runs `steps` steps on the buffers as they are, then puts the parameters back and
        clears the state and the loss sum: training is where it was. torch.compile compiles
        on the first call, and PyTorch asks for a few eager runs (on a side stream) before
        a CUDA graph capture, so that lazy initialisation is not captured."""
        saved = [p.detach().clone() for p in self.params]
        for _ in range(steps):
            self.run()
        with torch.no_grad():
            for p, value in zip(self.params, saved, strict=True):
                p.copy_(value)
        self.zero_grad()
        self.reset_state()
        self.total_loss.zero_()

    def capture(self) -> None:
        """Records step() once as a CUDA graph; run() then replays it. Call after warm_up
        on a side stream. Capture runs nothing: parameters and buffers are left as they are."""
        self.zero_grad()  # the captured backward allocates the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        self.graph, self.run = graph, graph.replay

    def prepare(self, mode: str, warmup_steps: int = 3) -> str:
        """Sets the step up for a sync-free mode (eager, compile, cuda-graphs), warming it
        up where the mode compiles or captures; returns the mode that will run, which is
        eager where CUDA graphs cannot be used (the reason goes to stderr)."""
        if mode not in MODES or mode == "book":
            raise ValueError(f"TrainStep.prepare: mode must be one of eager, compile, "
                             f"cuda-graphs, got {mode!r}")
        if mode == "compile":
            # dynamic=False: every minibatch has the same shapes, so one compilation.
            self.forward_loss = torch.compile(self.forward_loss, dynamic=False)
            self.warm_up(warmup_steps)
        elif mode == "cuda-graphs":
            device = self.X.device
            if device.type != "cuda":
                return self._fall_back(f"CUDA graphs need a CUDA device, the model is on "
                                       f"{device}")
            with torch.cuda.device(device):
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    self.warm_up(warmup_steps)
                torch.cuda.current_stream(device).wait_stream(side)
                try:
                    self.capture()
                except Exception as e:  # reported, and the same step runs eagerly instead
                    self.graph, self.run = None, self.step
                    self.zero_grad()  # gradients that pointed into the failed capture's pool
                    torch.cuda.synchronize(device)
                    return self._fall_back(f"capturing the step failed: {type(e).__name__}: "
                                           f"{e}")
        return mode

    @staticmethod
    def _fall_back(why: str) -> str:
        print(f"gru_fused.train: --cuda-graphs: {why}; running the sync-free step eagerly "
              "instead", file=sys.stderr)
        return "eager"


def device_batches(train_iter, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """One pass over train_iter, moved to the device ahead of use in one copy:
    (X [N, B, T], y [N, T * B]) int64, y time-major as the model's output rows."""
    batches = list(train_iter)
    if not batches:
        raise ValueError(NO_MINIBATCH)
    Xs = torch.stack([X for X, _ in batches])
    ys = torch.stack([Y.T.reshape(-1) for _, Y in batches])
    return Xs.to(device=device, dtype=torch.long), ys.to(device=device, dtype=torch.long)


def train_epoch_sync_free(step: TrainStep, train_iter, use_random_iter: bool,
                          step_losses: Optional[List[float]] = None):
    """train_epoch with TrainStep: the same minibatches, state handling, loss and
    measures, returned the same way. The host waits for the device once per epoch, to read
    the loss sum, instead of twice per minibatch (the upload of the epoch's minibatches
    comes after the previous epoch's read, when the device is idle)."""
    start = time.perf_counter()
    Xs, ys = device_batches(train_iter, step.X.device)
    if Xs.shape[1:] != step.X.shape:
        raise ValueError(f"minibatches of shape {list(Xs.shape[1:])}, but the step was "
                         f"built for {list(step.X.shape)} (batch_size, num_steps)")
    step.total_loss.zero_()
    losses = []
    for i in range(Xs.shape[0]):
        if i == 0 or use_random_iter:
            # Random minibatches are not adjacent in the text: start from zeros.
            step.reset_state()
        step.X.copy_(Xs[i])
        step.y.copy_(ys[i])
        step.run()
        if step_losses is not None:
            losses.append(step.loss.clone())  # the buffer is overwritten by the next step
    total_loss = step.total_loss.item()  # the epoch's one wait for the device
    elapsed = time.perf_counter() - start
    if step_losses is not None:
        step_losses.extend(torch.stack(losses).tolist())
    total_tokens = ys.numel()
    return math.exp(total_loss / total_tokens), total_tokens / elapsed, total_tokens, elapsed


class Training:
    """One training run of the book's recipe, advanced an epoch per epoch() call, so that
    a caller can interleave runs (benchmarks/bench.py alternates training modes epoch by
    epoch, so that other work on the machine slows them alike).

    mode is one of MODES: "book" runs train_epoch, the others train_epoch_sync_free
    with a TrainStep (which needs train_iter.batch_size and num_steps, as
    data.SeqDataLoader has), set up here: compiled or captured before the first epoch.
    history holds perplexity and tokens_per_sec per epoch, the total tokens and seconds
    of the epoch loops, the mode that runs (eager where CUDA graphs fell back) and the
    seconds spent setting it up (not in the epochs' time).
    """

    def __init__(self, net, train_iter, lr: float, device, use_random_iter: bool = False,
                 step_losses: Optional[List[float]] = None, mode: str = "eager",
                 theta: float = 1):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
        loss = nn.CrossEntropyLoss()
        if isinstance(net, nn.Module):
            updater = torch.optim.SGD(net.parameters(), lr)
        else:
            def updater(batch_size):
                sgd(net.params, lr, batch_size)

        self.history = {"perplexity": [], "tokens_per_sec": [], "tokens": 0, "seconds": 0.0,
                        "mode": mode, "setup_seconds": 0.0}
        if mode == "book":
            self._epoch = functools.partial(train_epoch, net, train_iter, loss, updater,
                                            device, use_random_iter, step_losses, theta)
            return
        if isinstance(updater, torch.optim.Optimizer):
            update = updater.step
        else:
            update = functools.partial(updater, batch_size=1)  # the loss is already a mean
        start = time.perf_counter()
        step = TrainStep(net, loss, update, train_iter.batch_size, train_iter.num_steps,
                         device, theta)
        self.history["mode"] = step.prepare(mode)
        _synchronize(device)
        self.history["setup_seconds"] = time.perf_counter() - start
        self._epoch = functools.partial(train_epoch_sync_free, step, train_iter,
                                        use_random_iter, step_losses)

    def epoch(self) -> Tuple[float, float]:
        """One pass over the minibatches: (perplexity, tokens/sec), also added to history."""
        ppl, speed, tokens, seconds = self._epoch()
        self.history["perplexity"].append(ppl)
        self.history["tokens_per_sec"].append(speed)
        self.history["tokens"] += tokens
        self.history["seconds"] += seconds
        return ppl, speed


def predictions(net, vocab, device) -> Dict[str, str]:
    """The book's two generated lines, one per prefix."""
    return {p: predict(p, NUM_PREDS, net, vocab, device) for p in PREFIXES}


def train(net, train_iter, vocab, lr: float, num_epochs: int, device,
          use_random_iter: bool = False, progress: bool = True, sample_every: int = 0,
          desc: str = "train", step_losses: Optional[List[float]] = None,
          mode: str = "eager", theta: float = 1) -> Dict:
    """d2l.train_ch8 without the animator (gradients clipped to norm theta, the book's 1),
    in one of MODES: returns Training's history, with the generated samples and the
    book's two generated lines added.
    """
    tqdm = _train_extra("tqdm.auto").tqdm
    training = Training(net, train_iter, lr, device, use_random_iter, step_losses, mode,
                        theta)
    history = training.history
    history["samples"] = []
    bar = tqdm(range(num_epochs), desc=desc, disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for epoch in bar:
        ppl, speed = training.epoch()
        bar.set_postfix(ppl=f"{ppl:.2f}", tok_s=f"{speed:,.0f}")
        if sample_every and (epoch + 1) % sample_every == 0:
            sample = predict(PREFIXES[0], NUM_PREDS, net, vocab, device)
            history["samples"].append({"epoch": epoch + 1, "text": sample})
            (bar.write if progress else print)(f"epoch {epoch + 1}: {sample}")
    bar.close()
    history["predictions"] = predictions(net, vocab, device)
    return history


# --- Running it: the command line and what it records ---------------------------------

def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def environment(device) -> Dict:
    """What a speed number depends on: versions, device name, threads."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({os.cpu_count()} logical cores)"
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_info() -> Dict:
    """The gru_fused that ran: its version and the git commit it was built from
    (gru_fused.__commit__, "-dirty" when built from a modified checkout)."""
    from . import __commit__, __version__

    return {"version": __version__, "commit": __commit__}


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where the OS has none): a busy machine
    slows every timing, so records keep it from the start and the end of a run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def data_info(data_path=None) -> Dict:
    """The text a run read: its path and SHA-1 (data.SHA1 once verified)."""
    path = tm_data.time_machine_path(data_path, allow_download=False)
    return {"path": str(path.resolve()), "sha1": tm_data.sha1_of(path.read_bytes())}


def format_environment(env: Dict) -> str:
    return (f"torch {env['torch']}, CUDA {env['cuda'] or 'none'} "
            f"(available: {env['cuda_available']}), device {env['device']} "
            f"[{env['device_name']}], {env['threads']} threads")


def run(impl: str, epochs: int = 500, num_hiddens: int = 256, batch_size: int = 32,
        num_steps: int = 35, lr: float = 1.0, device="auto", seed: int = 0,
        data_path=None, max_tokens: int = 10000, use_random_iter: bool = False,
        progress: bool = True, sample_every: int = 0, mode: str = "eager") -> Dict:
    """Train one implementation with the book's recipe in one of MODES; returns the
    run's record."""
    load_start = load_average()
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    random.seed(seed)  # the iterators' offsets and shuffles
    train_iter, vocab = tm_data.load_data_time_machine(batch_size, num_steps, use_random_iter,
                                                       max_tokens, data_path)
    net = make_net(impl, len(vocab), num_hiddens, device, seed)
    history = train(net, train_iter, vocab, lr, epochs, device, use_random_iter,
                    progress=progress, sample_every=sample_every, desc=f"{impl} {mode}",
                    mode=mode)
    return {
        "impl": impl,
        "mode": mode,
        "mode_run": history["mode"],  # eager where --cuda-graphs fell back
        "setup_seconds": history["setup_seconds"],  # compiling or capturing, not timed
        "gru_fused": build_info(),
        "data": data_info(data_path),
        "loadavg": {"start": load_start, "end": load_average()},
        "config": {"epochs": epochs, "num_hiddens": num_hiddens, "batch_size": batch_size,
                   "num_steps": num_steps, "lr": lr, "seed": seed, "max_tokens": max_tokens,
                   "use_random_iter": use_random_iter, "vocab_size": len(vocab)},
        "environment": environment(device),
        "perplexity": history["perplexity"][-1] if epochs else float("nan"),
        # The book prints the last epoch's speed; the mean over all epochs is steadier.
        "tokens_per_sec": history["tokens_per_sec"][-1] if epochs else float("nan"),
        "tokens_per_sec_mean": history["tokens"] / history["seconds"] if epochs else float("nan"),
        "train_seconds": history["seconds"],
        "history": {"perplexity": history["perplexity"],
                    "tokens_per_sec": history["tokens_per_sec"]},
        "samples": history["samples"],
        "predictions": history["predictions"],
    }


def plot_perplexity(curves: Dict[str, Sequence[float]], path: Path, title: str) -> Path:
    """Perplexity per epoch, one line per curve, like the book's figure."""
    matplotlib = _train_extra("matplotlib")
    matplotlib.use("Agg")
    plt = _train_extra("matplotlib.pyplot")
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3.5))
    # Curves of the same formula from the same seed coincide: vary style and width so
    # a later one drawn over an earlier one leaves it visible.
    styles = ("-", "--", "-.", ":")
    for i, (label, ppl) in enumerate(curves.items()):
        ax.plot(range(1, len(ppl) + 1), ppl, label=label, linestyle=styles[i % len(styles)],
                linewidth=max(3.0 - 0.6 * i, 1.0))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.5
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def unique_stem(out: Path, prefix: str) -> str:
    """prefix-<date>-<time>, with a counter added if a file of that name exists in out."""
    stem = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = stem, 1
    while any(out.glob(candidate + ".*")):
        candidate, n = f"{stem}-{n}", n + 1
    return candidate


def json_safe(obj):
    """obj with every non-finite float (NaN, +-Infinity) replaced by None, so that
    json.dumps(..., allow_nan=False) writes valid JSON (null) instead of NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


# --- Checking the command line before any work -----------------------------------------
# Argument errors go through argparse (parser.error or a type= validator): one line
# "prog: error: argument --name: ...", exit status 2, before any data, training or timing.

def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def minibatch_problem(num_tokens: int, batch_size: int, num_steps: int,
                      use_random_iter: bool = False, max_tokens: int = -1) -> Optional[str]:
    """None when a corpus of num_tokens yields at least one minibatch every epoch, else an
    argparse-style message ("argument --name: ...") naming the argument to change and
    its bound.

    gru_fused.data's iterators start at a random offset, at most num_steps (sequential)
    or num_steps - 1 (random), and keep one token for the shifted labels: the sequential
    one has (n - offset - 1) // batch_size columns, cut into minibatches of num_steps;
    the random one has (n - offset - 1) // num_steps subsequences, grouped by batch_size.
    Either way one minibatch, whatever the offset, needs n >= (batch_size + 1) *
    num_steps + 1 tokens (sequential) or n >= (batch_size + 1) * num_steps (random).
    """
    slack = 0 if use_random_iter else 1
    need = (batch_size + 1) * num_steps + slack
    if num_tokens >= need:
        return None
    max_batch = (num_tokens - slack) // num_steps - 1  # for this num_steps
    max_steps = (num_tokens - slack) // (batch_size + 1)  # for this batch_size
    kind = "random" if use_random_iter else "sequential"
    cut = " (cut by --max-tokens)" if 0 < max_tokens <= num_tokens else ""
    what = (f"one {kind} minibatch of --batch-size {batch_size} x --num-steps {num_steps} "
            f"needs a corpus of at least {need} tokens, but it has {num_tokens}{cut}")
    if max_batch >= 1:
        also = f" (or --num-steps <= {max_steps})" if max_steps >= 1 else ""
        return (f"argument --batch-size: {batch_size} is too large: {what}; with --num-steps "
                f"{num_steps}, --batch-size must be <= {max_batch}{also}")
    if max_steps >= 1:
        return (f"argument --num-steps: {num_steps} is too large: {what}; with --batch-size "
                f"{batch_size}, --num-steps must be <= {max_steps}")
    name = "--max-tokens" if cut else "--batch-size"
    return (f"argument {name}: {what}; raise --max-tokens (<= 0: the whole text) or lower "
            f"--batch-size and --num-steps")


def check_device(parser: argparse.ArgumentParser, device: str) -> torch.device:
    """The device of --device, or a parser error if it is malformed or absent."""
    try:
        resolved = resolve_device(device)
    except RuntimeError as e:
        parser.error(f"argument --device: {e}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {device}: no CUDA device is available "
                     "(use --device cpu)")
    return resolved


def check_data(parser: argparse.ArgumentParser, data: Optional[str], max_tokens: int,
               batch_size: int, num_steps: int, use_random_iter: bool = False) -> Path:
    """The verified path of the text (as gru_fused.data finds it), after checking that its
    corpus, cut to max_tokens, gives at least one minibatch. Loading and hashing the text
    takes milliseconds; a bad --data or a too-short corpus is a parser error (exit 2). A
    bad $GRU_FUSED_DATA, cache or download exits with status 1 and data.py's advice."""
    try:
        path = tm_data.time_machine_path(data)
        corpus, _ = tm_data.load_corpus_time_machine(max_tokens, path)
    except tm_data.DataError as e:
        if data is not None:
            parser.error(f"argument --data: {e}")
        raise SystemExit(f"error: {e}")
    problem = minibatch_problem(len(corpus), batch_size, num_steps, use_random_iter,
                                max_tokens)
    if problem:
        parser.error(problem)
    return path


def check_out(parser: argparse.ArgumentParser, out: str) -> Path:
    """--out as a directory that exists and takes files (created if needed), else a parser
    error: found before the run, not after it."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        parser.error(f"argument --out: {out} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        parser.error(f"argument --out: cannot create or write to the directory {out}: "
                     f"{e.strerror or e}")
    return path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default, and descriptions keep their line breaks."""


def add_mode_arguments(p: argparse.ArgumentParser) -> None:
    """--mode, and --compile / --cuda-graphs as its short forms (one of the three)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--mode", choices=MODES, default="eager",
                       help="training step: book (the book's loop, host syncs per "
                            "minibatch), eager (sync-free, same numbers), compile, "
                            "cuda-graphs")
    group.add_argument("--compile", dest="mode", action="store_const", const="compile",
                       help="same as --mode compile: the model and loss under torch.compile")
    group.add_argument("--cuda-graphs", dest="mode", action="store_const",
                       const="cuda-graphs",
                       help="same as --mode cuda-graphs: the whole step replayed as one "
                            "CUDA graph (eager, with a message, where not possible)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gru_fused.train",
        description="Train the d2l GRU character model on The Time Machine.",
        formatter_class=HelpFormatter)
    p.add_argument("--impl", choices=IMPLS, default="fused", help="GRU implementation")
    p.add_argument("--epochs", type=positive_int, default=500, help="training epochs (>= 1)")
    p.add_argument("--hidden", type=positive_int, default=256, help="number of hidden units")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="sequences per minibatch (>= 1; the corpus must hold one minibatch)")
    p.add_argument("--num-steps", type=positive_int, default=35,
                   help="time steps per minibatch (>= 1; the corpus must hold one minibatch)")
    p.add_argument("--lr", type=positive_float, default=1.0, help="SGD learning rate (> 0)")
    p.add_argument("--max-tokens", type=int, default=10000,
                   help="corpus length cut (the book's 10000; <= 0 for the whole text)")
    p.add_argument("--random-iter", action="store_true",
                   help="random instead of sequential minibatches")
    add_mode_arguments(p)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (>= 1; None: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and minibatches")
    p.add_argument("--data", default=None,
                   help=f"path of timemachine.txt (else ${tm_data.ENV_VAR}, the cache, a download)")
    p.add_argument("--out", default="runs", help="directory for the JSON record and the plot")
    p.add_argument("--sample-every", type=non_negative_int, default=50,
                   help="print a generated line every N epochs (0: never)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every check before any work: argument values, the device, the corpus, --out.
    device = check_device(parser, args.device)
    data_path = check_data(parser, args.data, args.max_tokens, args.batch_size,
                           args.num_steps, args.random_iter)
    out = check_out(parser, args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        record = run(args.impl, args.epochs, args.hidden, args.batch_size, args.num_steps,
                     args.lr, device, args.seed, data_path, args.max_tokens,
                     args.random_iter, progress=not args.no_progress,
                     sample_every=args.sample_every, mode=args.mode)
    except tm_data.DataError as e:
        raise SystemExit(f"error: {e}")
    print(f"perplexity {record['perplexity']:.1f}, {record['tokens_per_sec']:.1f} tokens/sec "
          f"on {record['environment']['device']} (mean over epochs "
          f"{record['tokens_per_sec_mean']:.1f}), mode {record['mode_run']}")
    for prefix in PREFIXES:
        print(record["predictions"][prefix])
    print(format_environment(record["environment"]))

    stem = unique_stem(out, f"train-{args.impl}")
    json_path = out / f"{stem}.json"
    write_json(json_path, record)
    png_path = plot_perplexity({args.impl: record["history"]["perplexity"]}, out / f"{stem}.png",
                               f"{args.impl}: perplexity {record['perplexity']:.2f}")
    print(f"wrote {json_path} and {png_path}")
    return record


if __name__ == "__main__":
    main()
