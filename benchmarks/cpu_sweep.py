"""CPU speed of FusedGRU against torch.nn.GRU and against the GEMM floor (issue 6).

    python benchmarks/cpu_sweep.py                  # everything; ~15 minutes on 2 cores
    python benchmarks/cpu_sweep.py --no-sweep       # the time machine tables only; ~1 minute
    python benchmarks/cpu_sweep.py --smoke          # seconds; what the tests run

float32, one layer, one direction, CPU. Every table is printed with the environment it
was measured in. Candidates are timed interleaved, in --rounds rounds of
torch.utils.benchmark blocked_autorange each; a cell is the median over rounds.

1. Time machine layer (one-hot input I=28, H=256, B=32, T=35), with one thread and with
   the default thread count: forward under torch.no_grad() and forward+backward
   (torch.autograd.grad of the output w.r.t. the parameters), for nn.GRU and FusedGRU;
   tokens/sec = T * B / time. The GEMM floor is the time of the matmuls that any GRU
   must do, run back to back with torch.mm at the same thread count: T recurrent
   matmuls h W_hh^T [B, H] x [H, 3H] forward, T matmuls dGh W_hh [B, 3H] x [3H, H]
   backward, and the weight gradient dGh^T h_prev [3H, T*B] x [T*B, H] (a one-hot
   input's projection is a row gather, no GEMM). cpu/wall is the
   process CPU time over the wall time of FusedGRU's runs: about 1 with one thread
   shows the thread setting is respected.
2. Memory saved for backward: the bytes of the unique storages that autograd holds for
   the backward (torch.autograd.graph.saved_tensors_hooks), less those of the inputs
   (x and an explicit h0) and the parameters, which exist anyway. FusedGRU's bound: the
   outputs plus 4*T*B*H values.
3. Sweep: H in {64, 256, 1024}, B in {1, 32, 128}, T in {35, 256}, I = H, dense input,
   per thread count: both passes for both layers, and FusedGRU's forward+backward as a
   multiple of its GEMM floor, which for a dense input also holds the input projection
   x W_ih^T [T*B, I] x [I, 3H] and its gradients dX = dG W_ih and dW_ih = dG^T x.

Results also go to --json when given.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils import benchmark

try:
    import gru_fused  # noqa: F401
except ModuleNotFoundError as e:  # not installed: run from the checkout this file is in
    if e.name != "gru_fused":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gru_fused import FusedGRU  # noqa: E402
from gru_fused.train import cpu_name  # noqa: E402

TIME_MACHINE = dict(T=35, B=32, I=28, H=256)
SWEEP_H, SWEEP_B, SWEEP_T = (64, 256, 1024), (1, 32, 128), (35, 256)


# --- Environment -----------------------------------------------------------------------

def mkl_version() -> str:
    if not torch.backends.mkl.is_available():
        return "none"
    for line in torch.__config__.show().splitlines():
        if "Math Kernel Library" in line:  # "... Library Version 2024.2-Product Build ..."
            words = line.split("Version", 1)[-1].split()
            return words[0].split("-")[0] if words else "yes"
    return "yes"


def environment() -> Dict:
    return {
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "default_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": mkl_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def format_environment(env: Dict, threads: Sequence[int]) -> str:
    # The load now, as the table is printed: other jobs on the machine skew timings.
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    load_s = f", load average {load[0]:.2f} (1 min)" if load else ""
    return (f"torch {env['torch']}, CPU {env['cpu']} ({env['cores']} cores, "
            f"{env['cpu_capability']}), MKL {env['mkl']}, threads "
            f"{' and '.join(map(str, threads))} (default {env['default_threads']}){load_s}")


# --- Timing ----------------------------------------------------------------------------

def interleaved(fns: Dict[str, Callable[[], object]], threads: int, rounds: int,
                min_run_time: float) -> Dict[str, float]:
    """Median seconds per call of each fn: every round times each fn in turn (so a
    change of machine load hits all candidates alike), then the median over rounds.
    A fn slower than min_run_time is timed one call per round (and in 3 rounds at most
    when one call takes over 5 s)."""
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
              for name, fn in fns.items()}
    warm = {name: timer.timeit(1).median for name, timer in timers.items()}  # also warm-up
    if max(warm.values()) > 5.0:
        rounds = min(rounds, 3)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            if warm[name] > min_run_time:
                times[name].append(timer.timeit(1).median)
            else:
                times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_over_wall(fn: Callable[[], object], threads: int, min_time: float) -> float:
    """Process CPU time over wall time of repeated calls of fn at `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn()
        wall0, cpu0, calls = time.perf_counter(), time.process_time(), 0
        while calls < 3 or time.perf_counter() - wall0 < min_time:
            fn()
            calls += 1
        return (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    finally:
        torch.set_num_threads(previous)


# --- The candidates --------------------------------------------------------------------

class Case:
    """nn.GRU and FusedGRU with the same weights on one input, and the GEMM floor."""

    def __init__(self, T: int, B: int, I: int, H: int, one_hot: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.T, self.B, self.I, self.H = T, B, I, H
        if one_hot:
            self.x = nn.functional.one_hot(torch.randint(0, I, (T, B)), I).float()
        else:
            self.x = torch.randn(T, B, I)
        self.grad = torch.randn(T, B, H)
        self.h0 = torch.zeros(B, H)  # passed explicitly: an input, like x
        self.one_hot = one_hot
        self.nn = nn.GRU(I, H)
        self.fused = FusedGRU(I, H)
        self.fused.load_state_dict(self.nn.state_dict())
        # The floor's operands.
        G = 3 * H
        self.h, self.w = torch.randn(B, H), torch.randn(G, H) * H ** -0.5
        self.gh, self.dh = torch.empty(B, G), torch.zeros(B, H)
        self.dgh, self.h_prev = torch.randn(T, B, G), torch.randn(T * B, H)
        self.dw = torch.empty(G, H)
        self.w_ih = torch.randn(G, I) * I ** -0.5
        self.x2d, self.gi = self.x.view(T * B, I), torch.empty(T * B, G)
        self.dx, self.dw_ih = torch.empty(T * B, I), torch.empty(G, I)

    def forward(self, layer: nn.Module) -> Callable[[], object]:
        def run():
            with torch.no_grad():
                return layer(self.x, self.h0[None])
        return run

    def forward_backward(self, layer: nn.Module) -> Callable[[], object]:
        params = list(layer.parameters())
        # autograd.grad rather than backward(): no accumulation into .grad between runs.
        return lambda: torch.autograd.grad(layer(self.x, self.h0[None])[0], params, self.grad)

    def floor_forward(self) -> None:
        if not self.one_hot:
            torch.mm(self.x2d, self.w_ih.t(), out=self.gi)
        for _ in range(self.T):
            torch.mm(self.h, self.w.t(), out=self.gh)

    def floor_forward_backward(self) -> None:
        self.floor_forward()
        for t in range(self.T):
            self.dh.addmm_(self.dgh[t], self.w)
        dg = self.dgh.view(-1, 3 * self.H)
        torch.mm(dg.t(), self.h_prev, out=self.dw)
        if not self.one_hot:
            torch.mm(dg, self.w_ih, out=self.dx)
            torch.mm(dg.t(), self.x2d, out=self.dw_ih)

    def candidates(self) -> Dict[str, Callable[[], object]]:
        return {
            "nn_fwd": self.forward(self.nn), "fused_fwd": self.forward(self.fused),
            "nn_fb": self.forward_backward(self.nn),
            "fused_fb": self.forward_backward(self.fused),
            "floor_fwd": self.floor_forward, "floor_fb": self.floor_forward_backward,
        }

    def saved_bytes(self, layer: nn.Module) -> int:
        """Bytes of the unique storages saved for backward, beyond input and parameters."""
        storages: Dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(self.x, self.h0[None])
        exist = {t.untyped_storage().data_ptr()
                 for t in [self.x, self.h0, *layer.parameters()]}
        del out
        return sum(n for ptr, n in storages.items() if ptr not in exist)


def measure_case(case: Case, threads: int, rounds: int, min_run_time: float) -> Dict:
    t = interleaved(case.candidates(), threads, rounds, min_run_time)
    tokens = case.T * case.B
    return {
        "threads": threads, **t,
        "fwd_speedup": t["nn_fwd"] / t["fused_fwd"],
        "fb_speedup": t["nn_fb"] / t["fused_fb"],
        "fwd_tokens_per_sec": {"nn": tokens / t["nn_fwd"], "fused": tokens / t["fused_fwd"]},
        "fb_tokens_per_sec": {"nn": tokens / t["nn_fb"], "fused": tokens / t["fused_fb"]},
        "fwd_vs_floor": t["fused_fwd"] / t["floor_fwd"],
        "fb_vs_floor": t["fused_fb"] / t["floor_fb"],
    }


# --- Tables ----------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:,.0f}"


def time_machine_table(rows: List[Dict], env: Dict, threads: Sequence[int]) -> str:
    s = TIME_MACHINE
    lines = [f"## Time machine layer: one-hot I={s['I']}, H={s['H']}, B={s['B']}, "
             f"T={s['T']}, float32",
             f"environment: {format_environment(env, threads)}",
             "",
             "| threads | pass | nn.GRU ms | FusedGRU ms | nn.GRU tok/s | FusedGRU tok/s "
             "| speed-up | GEMM floor ms | FusedGRU / floor | cpu/wall |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for key, name in (("fwd", "forward, no_grad"), ("fb", "forward+backward")):
            lines.append(
                f"| {r['threads']} | {name} | {ms(r[f'nn_{key}'])} | {ms(r[f'fused_{key}'])} "
                f"| {r[f'{key}_tokens_per_sec']['nn']:,.0f} "
                f"| {r[f'{key}_tokens_per_sec']['fused']:,.0f} | {r[f'{key}_speedup']:.2f}x "
                f"| {ms(r[f'floor_{key}'])} | {r[f'{key}_vs_floor']:.2f}x "
                f"| {r[f'cpu_over_wall_{key}']:.2f} |")
    lines += ["",
              "GEMM floor: the recurrent matmuls (forward; and backward) and the weight "
              "gradient dW_hh alone, back to back with torch.mm at the same thread count."]
    return "\n".join(lines)


def memory_table(mem: Dict, env: Dict, threads: Sequence[int]) -> str:
    s = TIME_MACHINE
    lines = [f"## Memory saved for backward: I={s['I']}, H={s['H']}, B={s['B']}, "
             f"T={s['T']}, float32",
             f"environment: {format_environment(env, threads)}",
             "",
             "| layer | bytes saved for backward | values per T*B*H |",
             "|---|---:|---:|"]
    tbh = s["T"] * s["B"] * s["H"]
    for name, key in (("torch.nn.GRU", "nn"), ("FusedGRU", "fused"),
                      ("bound: outputs + 4*T*B*H", "bound")):
        lines.append(f"| {name} | {mem[key]:,} | {mem[key] / 4 / tbh:.2f} |")
    lines += ["",
              "Unique storages held by autograd for the backward, less the inputs' (x and "
              "h0, passed explicitly) and the parameters'. FusedGRU's are its output (the "
              "very tensor it returns) and the [4, T, B, H] workspace (r, z, n, "
              "W_hn h + b_hn). Called without h0, either layer also keeps the [B, H] zeros "
              "it makes."]
    return "\n".join(lines)


def sweep_table(rows: List[Dict], env: Dict, threads: int) -> str:
    lines = [f"## Sweep, I = H, dense input, float32, {threads} thread{'s' * (threads > 1)}",
             f"environment: {format_environment(env, [threads])}",
             "",
             "| H | B | T | fwd nn.GRU ms | fwd FusedGRU ms | fwd speed-up "
             "| fwd+bwd nn.GRU ms | fwd+bwd FusedGRU ms | fwd+bwd speed-up "
             "| fwd+bwd / floor |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['H']} | {r['B']} | {r['T']} | {ms(r['nn_fwd'])} "
                     f"| {ms(r['fused_fwd'])} | {r['fwd_speedup']:.2f}x | {ms(r['nn_fb'])} "
                     f"| {ms(r['fused_fb'])} | {r['fb_speedup']:.2f}x "
                     f"| {r['fb_vs_floor']:.2f}x |")
    worst = min(min(r["fwd_speedup"], r["fb_speedup"]) for r in rows)
    lines += ["", f"slowest point: FusedGRU at {worst:.2f}x nn.GRU's speed.",
              "floor: the recurrent matmuls (forward and backward), dW_hh, the input "
              "projection, dX and dW_ih alone, back to back with torch.mm at the same "
              "thread count."]
    return "\n".join(lines)


# --- Command line ----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/cpu_sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts to measure (default: 1 and torch's default)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per point")
    p.add_argument("--min-run-time", type=float, default=0.3,
                   help="seconds per blocked_autorange measurement")
    p.add_argument("--no-sweep", action="store_true", help="time machine tables only")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long run on small shapes (for tests)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = build_parser().parse_args(argv)
    default_threads = torch.get_num_threads()
    threads = args.threads or sorted({1, default_threads})
    sweep_h, sweep_b, sweep_t = SWEEP_H, SWEEP_B, SWEEP_T
    if args.smoke:
        args.rounds, args.min_run_time = 1, 0.01
        sweep_h, sweep_b, sweep_t = (16,), (1, 4), (5,)
    env = environment()
    result: Dict = {"environment": env, "args": vars(args)}

    case = Case(**TIME_MACHINE, one_hot=True)
    rows = []
    for n in threads:
        row = measure_case(case, n, args.rounds, args.min_run_time)
        cpu_time = 0.05 if args.smoke else 1.0
        row["cpu_over_wall_fwd"] = cpu_over_wall(case.forward(case.fused), n, cpu_time)
        row["cpu_over_wall_fb"] = cpu_over_wall(case.forward_backward(case.fused), n, cpu_time)
        rows.append(row)
    result["time_machine"] = {"shape": TIME_MACHINE, "rows": rows}
    print(time_machine_table(rows, env, threads), end="\n\n", flush=True)

    s = TIME_MACHINE
    mem = {"nn": case.saved_bytes(case.nn), "fused": case.saved_bytes(case.fused),
           "bound": 4 * (s["T"] * s["B"] * s["H"] + 4 * s["T"] * s["B"] * s["H"])}
    result["memory"] = mem
    print(memory_table(mem, env, threads), end="\n\n", flush=True)

    if not args.no_sweep:
        result["sweep"] = {}
        for n in threads:
            sweep_rows = []
            for H, B, T in itertools.product(sweep_h, sweep_b, sweep_t):
                print(f"sweep: {n} thread(s), H={H} B={B} T={T}", file=sys.stderr, flush=True)
                point = Case(T=T, B=B, I=H, H=H, one_hot=False)
                sweep_rows.append({"H": H, "B": B, "T": T,
                                   **measure_case(point, n, args.rounds, args.min_run_time)})
                del point
            result["sweep"][n] = sweep_rows
            print(sweep_table(sweep_rows, env, n), end="\n\n", flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
