"""Where gru_fused's speed stands, on the book's task and on the book's layer shapes.

    python benchmarks/bench.py                 # default device, minutes on a 2-core CPU
    python benchmarks/bench.py --epochs 500    # the book's full run
    python benchmarks/bench.py --smoke         # seconds; what the tests run
    python benchmarks/bench.py --part train --impls nn fused --modes book compile

Two tables, each printed with the environment it was measured in:

1. Layer (issue 2): forward and forward+backward of one GRU layer on the book's shapes
   (one-hot input of 28, H=256, B=32, T=35, float32): torch.nn.GRU, the pure-PyTorch
   reference (gru_fused.reference.gru_layer) and FusedGRU (both formulas), timed with
   torch.utils.benchmark; tokens/sec = T * B / median time, ratio against nn.GRU.
2. Time machine (issues 5, 14): the four implementations of gru_fused.train trained with
   the book's recipe (H=256, B=32, T=35, lr 1, sequential minibatches, 10000 tokens) in
   each training mode (--modes: the book's loop; the sync-free step eagerly, under
   torch.compile, as a CUDA graph), an implementation's modes trained side by side,
   alternating epoch by epoch: perplexity reached, training tokens/sec measured as the
   book does (tokens over the wall time of the epoch loops; compiling and capturing are
   done before them and reported apart), and speed-ups against the book's loop with the
   scratch GRU and with nn.GRU, measured in the same run; then the network's
   forward+backward tokens/sec alone, per implementation.

Results also go to OUT/bench-<time>.json, with a PNG of the perplexity curves.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils import benchmark

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "gru_fused" / "__init__.py").is_file():
    # Measure the checkout this script belongs to, even where another copy is installed.
    sys.path.insert(0, str(_ROOT))

import gru_fused  # noqa: E402
from gru_fused import data as tm_data  # noqa: E402
from gru_fused import reference  # noqa: E402
from gru_fused import train as tm_train  # noqa: E402
from gru_fused.module import FusedGRU  # noqa: E402

IMPL_LABELS = {
    "scratch": "d2l scratch (Python loop)",
    "fused_scratch": "d2l scratch, fused op",
    "nn": "torch.nn.GRU",
    "fused": "FusedGRU",
}


def measure(fn: Callable, min_run_time: float, label: str, sub_label: str,
            description: str) -> benchmark.Measurement:
    """Median-based timing of fn() with the process's thread count (Timer's default is 1)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label, sub_label=sub_label,
                            description=description, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time)


def _fwd_bwd(forward: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
             grad: torch.Tensor) -> Callable[[], object]:
    # autograd.grad rather than backward(): no accumulation into .grad between runs.
    return lambda: torch.autograd.grad(forward(), params, grad)


# --- 1. The layer on the book's shapes ---------------------------------------------

def layer_benchmark(device, min_run_time: float, T: int = 35, B: int = 32, I: int = 28,
                    H: int = 256, dtype=torch.float32, seed: int = 0) -> List[Dict]:
    """Forward and forward+backward tokens/sec of one GRU layer per implementation."""
    torch.manual_seed(seed)
    tokens = torch.randint(0, I, (T, B), device=device)
    x = nn.functional.one_hot(tokens, I).to(dtype)  # [T, B, I], as the model feeds it
    h0 = torch.zeros(1, B, H, device=device, dtype=dtype)
    grad = torch.randn(T, B, H, device=device, dtype=dtype)

    base = nn.GRU(I, H).to(device=device, dtype=dtype)
    fused = FusedGRU(I, H).to(device=device, dtype=dtype)
    fused.load_state_dict(base.state_dict())
    fused_before = FusedGRU(I, H, reset_after=False).to(device=device, dtype=dtype)
    fused_before.load_state_dict(base.state_dict())
    weights = [base.weight_ih_l0, base.weight_hh_l0, base.bias_ih_l0, base.bias_hh_l0]

    cases = {
        "torch.nn.GRU": (lambda: base(x, h0)[0], list(base.parameters())),
        "reference.gru_layer": (lambda: reference.gru_layer(x, h0[0], *weights)[0], weights),
        "FusedGRU": (lambda: fused(x, h0)[0], list(fused.parameters())),
        "FusedGRU(reset_after=False)": (lambda: fused_before(x, h0)[0],
                                        list(fused_before.parameters())),
    }
    rows = []
    label = f"GRU layer, I={I} one-hot, H={H}, B={B}, T={T}, {str(dtype).replace('torch.', '')}"
    for name, (forward, params) in cases.items():
        def forward_only(forward=forward):
            with torch.no_grad():
                return forward()

        fwd = measure(forward_only, min_run_time, label, name, "forward")
        both = measure(_fwd_bwd(forward, params, grad), min_run_time, label, name,
                       "forward+backward")
        rows.append({"layer": name, "forward_s": fwd.median, "fwd_bwd_s": both.median,
                     "forward_tokens_per_sec": T * B / fwd.median,
                     "fwd_bwd_tokens_per_sec": T * B / both.median})
    ref = rows[0]
    for row in rows:
        row["forward_vs_nn"] = row["forward_tokens_per_sec"] / ref["forward_tokens_per_sec"]
        row["fwd_bwd_vs_nn"] = row["fwd_bwd_tokens_per_sec"] / ref["fwd_bwd_tokens_per_sec"]
    return rows


def format_layer_table(rows: List[Dict], shape: str, env: Dict) -> str:
    lines = [f"## GRU layer: {shape}",
             f"environment: {tm_train.format_environment(env)}",
             "",
             "| layer | forward tok/s | vs nn.GRU | fwd+bwd tok/s | vs nn.GRU |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['forward_tokens_per_sec']:,.0f} | "
                     f"{r['forward_vs_nn']:.2f}x | {r['fwd_bwd_tokens_per_sec']:,.0f} | "
                     f"{r['fwd_bwd_vs_nn']:.2f}x |")
    return "\n".join(lines)


# --- 2. The time machine task ------------------------------------------------------

def net_fwd_bwd(impl: str, vocab_size: int, num_hiddens: int, X: torch.Tensor, device,
                min_run_time: float, seed: int) -> float:
    """Tokens/sec of the network's forward+backward on one minibatch X [B, T]: one-hot
    input -> GRU -> output layer. The book's scratch functions compute the output layer
    themselves, so the module rows include their nn.Linear: every row does the same work.
    No loss, clipping or update."""
    net = tm_train.make_net(impl, vocab_size, num_hiddens, device, seed)
    X = X.to(device)
    state = net.begin_state(batch_size=X.shape[0], device=device)
    params = list(net.parameters())
    grad = torch.randn(X.numel(), vocab_size, device=device)
    m = measure(_fwd_bwd(lambda: net(X, state)[0], params, grad), min_run_time,
                "time machine network", impl, "forward+backward")
    return X.numel() / m.median


def train_benchmark(impls: Sequence[str], modes: Sequence[str], epochs: int,
                    num_hiddens: int, batch_size: int, num_steps: int, lr: float, device,
                    seed: int, data_path, max_tokens: int, min_run_time: float,
                    progress: bool) -> Dict[str, List[Dict]]:
    """{"rows": one per implementation and mode, "network": one per implementation}.

    Each row is a gru_fused.train.Training from the same seed: tokens/sec over its timed
    epoch loops (compiling and capturing happen before them: setup_seconds), and its
    ratios to the book's loop ("book" mode) with the scratch GRU and with nn.GRU, where
    those were run. An implementation's modes are trained side by side, alternating epoch
    by epoch, so that other work on the machine slows each alike; each run keeps its own
    Python random state (the iterators draw their offsets from it), so it sees the
    minibatches it would see alone. The network rows time one minibatch's
    forward+backward alone."""
    tqdm = tm_train._train_extra("tqdm.auto").tqdm
    rows = []
    for impl in impls:
        runs = []
        for mode in modes:
            random.seed(seed)
            train_iter, vocab = tm_data.load_data_time_machine(batch_size, num_steps, False,
                                                               max_tokens, data_path)
            net = tm_train.make_net(impl, len(vocab), num_hiddens, device, seed)
            training = tm_train.Training(net, train_iter, lr, device, mode=mode)
            runs.append({"mode": mode, "training": training, "net": net,
                         "random_state": random.getstate()})
        for _ in tqdm(range(epochs), desc=impl, disable=not progress, file=sys.stderr):
            for run in runs:
                random.setstate(run["random_state"])
                run["training"].epoch()
                run["random_state"] = random.getstate()
        for run in runs:
            h = run["training"].history
            rows.append({"impl": impl, "mode": run["mode"], "mode_run": h["mode"],
                         "setup_seconds": h["setup_seconds"],
                         "perplexity": h["perplexity"][-1],
                         "train_tokens_per_sec": h["tokens"] / h["seconds"],
                         "train_tokens_per_sec_last_epoch": h["tokens_per_sec"][-1],
                         # Other work on the machine only ever slows an epoch down.
                         "train_tokens_per_sec_best_epoch": max(h["tokens_per_sec"]),
                         "history": {"perplexity": h["perplexity"],
                                     "tokens_per_sec": h["tokens_per_sec"]},
                         "predictions": tm_train.predictions(run["net"], vocab, device)})
    train_iter, vocab = tm_data.load_data_time_machine(batch_size, num_steps, False,
                                                       max_tokens, data_path)
    X, _ = next(iter(train_iter))
    network = [{"impl": impl, "fwd_bwd_tokens_per_sec": net_fwd_bwd(
        impl, len(vocab), num_hiddens, X, device, min_run_time, seed)} for impl in impls]
    _add_ratios(rows, "train_tokens_per_sec", {
        base: r for r in rows for base in ("scratch", "nn")
        if r["impl"] == base and r["mode"] == "book"})
    _add_ratios(network, "fwd_bwd_tokens_per_sec", {r["impl"]: r for r in network})
    return {"rows": rows, "network": network}


def _add_ratios(rows: List[Dict], key: str, bases: Dict[str, Dict]) -> None:
    """row["vs_scratch"], row["vs_nn"]: row[key] over the base row's, where it was run."""
    for row in rows:
        for name in ("scratch", "nn"):
            if name in bases:
                row[f"vs_{name}"] = row[key] / bases[name][key]


def _ratio(row: Dict, name: str) -> str:
    return f"{row[f'vs_{name}']:.2f}x" if f"vs_{name}" in row else "-"


def format_train_table(result: Dict[str, List[Dict]], config: str, env: Dict) -> str:
    lines = [f"## Time machine: {config}",
             f"environment: {tm_train.format_environment(env)}",
             "",
             "| implementation | mode | perplexity | train tok/s | vs scratch book "
             "| vs nn.GRU book | best epoch tok/s | setup s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        mode = r["mode"] if r["mode_run"] == r["mode"] else f"{r['mode']} (ran {r['mode_run']})"
        lines.append(
            f"| {IMPL_LABELS[r['impl']]} | {mode} | {r['perplexity']:.2f} | "
            f"{r['train_tokens_per_sec']:,.0f} | {_ratio(r, 'scratch')} | {_ratio(r, 'nn')} | "
            f"{r['train_tokens_per_sec_best_epoch']:,.0f} | {r['setup_seconds']:.1f} |")
    lines += ["",
              "| implementation | network fwd+bwd tok/s | vs scratch | vs nn.GRU |",
              "|---|---:|---:|---:|"]
    for r in result["network"]:
        lines.append(f"| {IMPL_LABELS[r['impl']]} | {r['fwd_bwd_tokens_per_sec']:,.0f} | "
                     f"{_ratio(r, 'scratch')} | {_ratio(r, 'nn')} |")
    lines += ["",
              "mode: book is the book's loop (the host reads the gradient norm and the loss "
              "back every minibatch); eager the sync-free step (one read per epoch); compile "
              "it under torch.compile; cuda-graphs it replayed as one CUDA graph.",
              "train tok/s: tokens trained over the wall time of all epoch loops (the book's "
              "measure, over every epoch); vs scratch book, vs nn.GRU book: against the book's "
              "loop with that GRU, in this run. best epoch: the fastest epoch's tok/s, which "
              "other work on the machine can only lower. setup s: compiling or capturing, "
              "before the epochs, not in tok/s.",
              "network fwd+bwd: one minibatch, one-hot -> GRU -> output layer, forward and "
              "backward (torch.utils.benchmark median); no data, loss, clipping or update."]
    return "\n".join(lines)


# --- Command line --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                formatter_class=tm_train.HelpFormatter)
    p.add_argument("--epochs", type=tm_train.positive_int, default=50,
                   help="training epochs per implementation (>= 1; the book: 500)")
    p.add_argument("--hidden", type=tm_train.positive_int, default=256,
                   help="hidden units of the time machine models")
    p.add_argument("--batch-size", type=tm_train.positive_int, default=32,
                   help="sequences per minibatch (>= 1; the corpus must hold one minibatch)")
    p.add_argument("--num-steps", type=tm_train.positive_int, default=35,
                   help="time steps per minibatch (>= 1; the corpus must hold one minibatch)")
    p.add_argument("--lr", type=tm_train.positive_float, default=1.0,
                   help="SGD learning rate (> 0)")
    p.add_argument("--max-tokens", type=int, default=10000,
                   help="corpus length cut (the book's 10000; <= 0 for the whole text)")
    p.add_argument("--impls", nargs="+", choices=tm_train.IMPLS, default=list(tm_train.IMPLS),
                   help="implementations of the time machine table")
    p.add_argument("--modes", nargs="+", choices=tm_train.MODES, default=None,
                   help="training modes of the time machine table, each run for every "
                        "implementation (default: book eager compile, and cuda-graphs on "
                        "CUDA; with --smoke: book eager)")
    p.add_argument("--part", choices=("all", "layer", "train"), default="all",
                   help="which table(s) to produce")
    p.add_argument("--min-run-time", type=tm_train.positive_float, default=1.0,
                   help="seconds per torch.utils.benchmark measurement (> 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--threads", type=tm_train.positive_int, default=None,
                   help="torch intra-op threads (>= 1; None: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and minibatches")
    p.add_argument("--data", default=None,
                   help=f"path of timemachine.txt (else ${tm_data.ENV_VAR}, the cache, a download)")
    p.add_argument("--out", default="runs", help="directory for the JSON and the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long run: 2 epochs, H=16, short timings, modes book and "
                        "eager unless --modes (for tests)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.hidden, args.min_run_time = 2, 16, 0.01
    # Every check before any work: argument values, the device, the corpus (only the
    # time machine part reads it), --out.
    device = tm_train.check_device(parser, args.device)
    if device.type == "cuda" and not gru_fused.cuda_compiled():
        parser.error(f"argument --device: device {device} but this build of gru_fused has no "
                     "CUDA kernels; rebuild it with CUDA, or pass --device cpu")
    data_path = None
    if args.part in ("all", "train"):
        # train_benchmark uses sequential minibatches.
        data_path = tm_train.check_data(parser, args.data, args.max_tokens, args.batch_size,
                                        args.num_steps, use_random_iter=False)
    out = tm_train.check_out(parser, args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.modes is None:
        args.modes = (["book", "eager"] if args.smoke else
                      ["book", "eager", "compile"] + (["cuda-graphs"] if device.type == "cuda"
                                                      else []))
    env = tm_train.environment(device)
    result: Dict = {"environment": env, "args": vars(args), "gru_fused": tm_train.build_info(),
                    "loadavg": {"start": tm_train.load_average()}}

    if args.part in ("all", "layer"):
        shape = "one-hot input I=28, H=256, B=32, T=35, float32"
        rows = layer_benchmark(device, args.min_run_time)
        result["layer"] = {"shape": shape, "rows": rows}
        print(format_layer_table(rows, shape, env), end="\n\n", flush=True)

    if args.part in ("all", "train"):
        config = (f"{args.epochs} epochs, H={args.hidden}, B={args.batch_size}, "
                  f"T={args.num_steps}, lr={args.lr}, sequential, {args.max_tokens} tokens")
        try:
            train = train_benchmark(args.impls, args.modes, args.epochs, args.hidden,
                                    args.batch_size, args.num_steps, args.lr, device,
                                    args.seed, data_path, args.max_tokens, args.min_run_time,
                                    not args.no_progress)
        except tm_data.DataError as e:
            raise SystemExit(f"error: {e}")
        result["train"] = {"config": config, **train}
        result["data"] = tm_train.data_info(data_path)
        print(format_train_table(train, config, env), end="\n\n", flush=True)

    result["loadavg"]["end"] = tm_train.load_average()
    stem = tm_train.unique_stem(out, "bench")
    json_path = out / f"{stem}.json"
    tm_train.write_json(json_path, result)
    written = [str(json_path)]
    if "train" in result:
        curves = {f"{IMPL_LABELS[r['impl']]}, {r['mode']}": r["history"]["perplexity"]
                  for r in result["train"]["rows"]}
        png = tm_train.plot_perplexity(curves, out / f"{stem}.png",
                                       f"Time machine, H={args.hidden}, {device.type}")
        written.append(str(png))
    print("wrote " + " and ".join(written))
    return result


if __name__ == "__main__":
    main()
