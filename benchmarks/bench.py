"""Where gru_fused's speed stands, on the book's task and on the book's layer shapes.

    python benchmarks/bench.py                 # default device, a few minutes on a 2-core CPU
    python benchmarks/bench.py --epochs 500    # the book's full run
    python benchmarks/bench.py --smoke         # seconds; what the tests run

Two tables, each printed with the environment it was measured in:

1. Layer (issue 2): forward and forward+backward of one GRU layer on the book's shapes
   (one-hot input of 28, H=256, B=32, T=35, float32): torch.nn.GRU, the pure-PyTorch
   reference (gru_fused.reference.gru_layer) and FusedGRU (both formulas), timed with
   torch.utils.benchmark; tokens/sec = T * B / median time, ratio against nn.GRU.
2. Time machine (issue 5): the four implementations of gru_fused.train trained with the
   book's recipe (H=256, B=32, T=35, lr 1, sequential minibatches, 10000 tokens):
   perplexity reached, training tokens/sec measured as the book does (tokens over the
   wall time of the epoch loops), the network's forward+backward tokens/sec alone, and
   speed-ups against the book's scratch GRU and against nn.GRU.

Results also go to OUT/bench-<time>.json, with a PNG of the perplexity curves.
"""
from __future__ import annotations

import argparse
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


def train_benchmark(impls: Sequence[str], epochs: int, num_hiddens: int, batch_size: int,
                    num_steps: int, lr: float, device, seed: int, data_path,
                    max_tokens: int, min_run_time: float, progress: bool) -> List[Dict]:
    rows = []
    for impl in impls:
        record = tm_train.run(impl, epochs, num_hiddens, batch_size, num_steps, lr, device,
                              seed, data_path, max_tokens, progress=progress)
        train_iter, vocab = tm_data.load_data_time_machine(batch_size, num_steps, False,
                                                           max_tokens, data_path)
        X, _ = next(iter(train_iter))
        layer_tps = net_fwd_bwd(impl, len(vocab), num_hiddens, X, device, min_run_time, seed)
        rows.append({"impl": impl, "perplexity": record["perplexity"],
                     "train_tokens_per_sec": record["tokens_per_sec_mean"],
                     "train_tokens_per_sec_last_epoch": record["tokens_per_sec"],
                     "layer_fwd_bwd_tokens_per_sec": layer_tps,
                     "history": record["history"], "predictions": record["predictions"]})
    by_impl = {r["impl"]: r for r in rows}
    for row in rows:
        for base in ("scratch", "nn"):
            if base in by_impl:
                b = by_impl[base]
                row[f"train_vs_{base}"] = row["train_tokens_per_sec"] / b["train_tokens_per_sec"]
                row[f"layer_vs_{base}"] = (row["layer_fwd_bwd_tokens_per_sec"]
                                           / b["layer_fwd_bwd_tokens_per_sec"])
    return rows


def format_train_table(rows: List[Dict], config: str, env: Dict) -> str:
    def ratio(row, key):
        return f"{row[key]:.2f}x" if key in row else "-"

    lines = [f"## Time machine: {config}",
             f"environment: {tm_train.format_environment(env)}",
             "",
             "| implementation | perplexity | train tok/s | vs scratch | vs nn.GRU "
             "| layer fwd+bwd tok/s | vs scratch | vs nn.GRU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {IMPL_LABELS[r['impl']]} | {r['perplexity']:.2f} | "
            f"{r['train_tokens_per_sec']:,.0f} | {ratio(r, 'train_vs_scratch')} | "
            f"{ratio(r, 'train_vs_nn')} | {r['layer_fwd_bwd_tokens_per_sec']:,.0f} | "
            f"{ratio(r, 'layer_vs_scratch')} | {ratio(r, 'layer_vs_nn')} |")
    lines += ["",
              "train tok/s: tokens trained over the wall time of all epoch loops (the book's "
              "measure, over every epoch).",
              "layer fwd+bwd: one minibatch, one-hot -> GRU -> output layer, forward and "
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
                   help="seconds-long run: 2 epochs, H=16, short timings (for tests)")
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
            rows = train_benchmark(args.impls, args.epochs, args.hidden, args.batch_size,
                                   args.num_steps, args.lr, device, args.seed, data_path,
                                   args.max_tokens, args.min_run_time, not args.no_progress)
        except tm_data.DataError as e:
            raise SystemExit(f"error: {e}")
        result["train"] = {"config": config, "rows": rows}
        result["data"] = tm_train.data_info(data_path)
        print(format_train_table(rows, config, env), end="\n\n", flush=True)

    result["loadavg"]["end"] = tm_train.load_average()
    stem = tm_train.unique_stem(out, "bench")
    json_path = out / f"{stem}.json"
    tm_train.write_json(json_path, result)
    written = [str(json_path)]
    if "train" in result:
        curves = {IMPL_LABELS[r["impl"]]: r["history"]["perplexity"] for r in result["train"]["rows"]}
        png = tm_train.plot_perplexity(curves, out / f"{stem}.png",
                                       f"Time machine, H={args.hidden}, {device.type}")
        written.append(str(png))
    print("wrote " + " and ".join(written))
    return result


if __name__ == "__main__":
    main()
