"""torch.func.vmap over a GRU layer: GRUFunction's own vmap rule against PyTorch's
per-sample fallback (the rule generate_vmap_rule=True gives a custom op without a batching
rule) and a Python loop, side by side in one run.

    python benchmarks/vmap_bench.py [--samples 16] [--threads N]

Shapes: N samples of the time machine minibatch (one-hot I=28, H=256, B=32, T=35, float32),
vmapped over the inputs with the weights shared (the rule's one-call case), and over
stacked weights (an ensemble, where the rule makes one call per sample).
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

import gru_fused
from gru_fused.ops import GRUFunction
from gru_fused.train import HelpFormatter, environment, format_environment, positive_int


class PerSampleFallback(GRUFunction):
    """GRUFunction with the generated vmap rule instead of its own."""

    generate_vmap_rule = True
    vmap = torch.autograd.Function.vmap


def layer(fn, x, h, w):
    return fn.apply(x, h, *w, None, True, False)[0]


def median_ms(stmt, env, min_run_time):
    t = benchmark.Timer(stmt=stmt, globals=env).blocked_autorange(min_run_time=min_run_time)
    return t.median * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/vmap_bench.py", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--samples", type=positive_int, default=16, help="vmapped samples N")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    N, T, B, I, H = args.samples, 35, 32, 28, 256
    g = torch.Generator().manual_seed(0)
    x = F.one_hot(torch.randint(0, I, (N, T, B), generator=g), I).float()
    h = torch.zeros(B, H)
    w = [torch.randn(3 * H, I, generator=g) * 0.1, torch.randn(3 * H, H, generator=g) * 0.05,
         torch.zeros(3 * H), torch.zeros(3 * H)]
    ws = [t.expand(N, *t.shape).clone() for t in w]  # an ensemble of N layers

    def vmapped(fn):
        return torch.func.vmap(lambda xi: layer(fn, xi, h, w))

    def loss_grad(fn):  # per-sample gradients of the weights
        return torch.func.vmap(torch.func.grad(lambda wi, xi: layer(fn, xi, h, wi).sum()),
                               in_dims=(None, 0))

    def ensemble(fn):
        return torch.func.vmap(lambda wi: layer(fn, x[0], h, wi))

    env = {"torch": torch, "x": x, "h": h, "w": w, "ws": ws, "layer": layer,
           "GRUFunction": GRUFunction, "PerSampleFallback": PerSampleFallback}
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "performance drop" warning
        for name, make, call in [
                ("forward, vmap over inputs", vmapped, "f(x)"),
                ("per-sample weight gradients, vmap(grad)", loss_grad, "f(w, x)"),
                ("forward, vmap over stacked weights", ensemble, "f(ws)")]:
            times = {}
            for label, fn in (("rule", GRUFunction), ("fallback", PerSampleFallback)):
                env["f"] = make(fn)
                torch.testing.assert_close(eval(call, env), eval(call, {**env, "f": make(GRUFunction)}))
                times[label] = median_ms(call, env, args.min_run_time)
            if "inputs" in name:
                times["loop"] = median_ms(
                    "torch.stack([layer(GRUFunction, xi, h, w) for xi in x])", env,
                    args.min_run_time)
            rows.append((name, times))
    print(f"#### vmap over N={N} samples of one-hot I={I}, H={H}, B={B}, T={T}, float32")
    print(format_environment(environment(torch.device("cpu"))))
    print()
    print("| case | GRUFunction's rule ms | per-sample fallback ms | rule speed-up | Python loop ms |")
    print("|---|---:|---:|---:|---:|")
    for name, t in rows:
        loop = f"{t['loop']:.1f}" if "loop" in t else ""
        print(f"| {name} | {t['rule']:.1f} | {t['fallback']:.1f} | "
              f"{t['fallback'] / t['rule']:.2f}x | {loop} |")


if __name__ == "__main__":
    main()
