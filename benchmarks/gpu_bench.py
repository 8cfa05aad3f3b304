"""GPU benchmark: FusedGRU vs torch.nn.GRU (cuDNN) vs the pure-PyTorch reference.

    python benchmarks/gpu_bench.py [--json OUT.json] [--quick] [--per-kernel]

One layer, float32, forward and forward+backward, torch.utils.benchmark (it synchronises
and warms up). Shapes: the book's time machine shape (I=28, H=256, B=32, T=35) and the
grid H in {256, 1024} x B in {1, 32, 256} x T in {35, 256} with I = H; --quick: the book's
shape and three corners of the grid, with short timings. Prints the environment (with
the float32 precision cuDNN's RNNs and cuBLAS may use: PyTorch lets cuDNN use TF32 by
default, and the table keeps PyTorch's defaults) and one table: tokens/sec and the ratio
FusedGRU / nn.GRU.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf_model, kernel_resources
import gru_fused  # noqa: E402
from gru_fused import reference  # noqa: E402


def layer_fns(model, x, with_backward):
    if with_backward:
        def run():
            out, h_n = model(x)
            (out.sum() + h_n.sum()).backward()
    else:
        def run():
            with torch.no_grad():
                model(x)
    return run


class Reference(torch.nn.Module):
    def __init__(self, gru):
        super().__init__()
        self.gru = gru

    def forward(self, x):
        g = self.gru
        hx = x.new_zeros(x.shape[1], g.hidden_size)
        out, h = reference.gru_layer(x, hx, g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)
        return out, h[None]


def fp32_precision():
    """The float32 precision cuDNN's RNNs and cuBLAS's matmuls may use, as torch reports it
    (the per-operation settings where torch has them, else the legacy flags)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(cudnn, "rnn") and hasattr(matmul, "fp32_precision"):
        return {"cudnn_rnn": cudnn.rnn.fp32_precision, "cuda_matmul": matmul.fp32_precision}
    return {"cudnn_rnn": "tf32" if cudnn.allow_tf32 else "ieee",
            "cuda_matmul": "tf32" if matmul.allow_tf32 else "ieee"}


def profiled_kernel_us(run, repeats=3):
    """Mean GPU time per launch (µs) of each gru_fused step kernel during `repeats` calls
    of run, by model label ("forward fused (reset_after)", ...), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    import kernel_resources

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    total, count = {}, {}
    for avg in prof.key_averages():
        desc = kernel_resources.describe_kernel(avg.key)
        if desc is None:
            continue
        # self_device_time_total (torch >= 2.4) or self_cuda_time_total: µs over all calls.
        us = getattr(avg, "self_device_time_total", None)
        if us is None:
            us = avg.self_cuda_time_total
        total[desc["label"]] = total.get(desc["label"], 0.0) + us
        count[desc["label"]] = count.get(desc["label"], 0) + avg.count
    return {k: total[k] / count[k] for k in total}


def per_kernel_table(dev):
    """Measured µs per launch of each step kernel at the performance model's shapes,
    fp32, in benchmarks/perf_model.py's layout, the model's estimate beside each; and
    µs per step of a whole forward (eager and replayed from a CUDA graph)."""
    import perf_model

    import gru_fused._C as C

    shapes = {label: (28 if H == 256 else H, H, B, 35 if H == 256 else 256)
              for label, (H, B) in perf_model.SHAPES.items()}
    measured, steps = {}, {}
    for label, (I, H, B, T) in shapes.items():
        for reset_after in (True, False):
            torch.manual_seed(0)
            model = gru_fused.FusedGRU(I, H, reset_after=reset_after, device=dev)
            x = torch.randn(T, B, I, device=dev)
            for k, us in profiled_kernel_us(layer_fns(model, x, True)).items():
                measured[(k, label)] = us
            formula = "reset_after" if reset_after else "reset_before"
            forward = layer_fns(model, x, False)
            steps[(formula, label, "eager")] = measure(forward, 0.2) / T * 1e6
            static_x = x.clone()
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                model(static_x)  # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph), torch.no_grad():
                model(static_x)
            steps[(formula, label, "graph")] = measure(graph.replay, 0.2) / T * 1e6
    model_rows = {r["name"]: r for r in perf_model.rows_for(C.CUDA_TILES)}
    labels = sorted({k for k, _ in measured} | set(model_rows),
                    key=lambda k: (not k.startswith("forward"), k))
    lines = ["Per launch, µs, fp32: measured (the model's estimate)", "",
             "| kernel | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    for k in labels:
        cells = []
        for label in shapes:
            got = measured.get((k, label))
            est = model_rows[k][label]["gpu_us"] if k in model_rows else None
            cells.append(("-" if got is None else f"{got:.2f}")
                         + ("" if est is None else f" ({perf_model.fmt_range(*est)})"))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "Whole forward per step, µs (GEMM included): eager / CUDA graph", "",
              "| formula | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    for formula in ("reset_after", "reset_before"):
        lines.append(f"| {formula} | " + " | ".join(
            f"{steps[(formula, l, 'eager')]:.2f} / {steps[(formula, l, 'graph')]:.2f}"
            for l in shapes) + " |")
    return "\n".join(lines), {"per_launch_us": {f"{k} @ {l}": v for (k, l), v in measured.items()},
                              "per_step_us": {" @ ".join(k): v for k, v in steps.items()}}


def measure(fn, min_run_time):
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="four shapes, short timings")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on any device: checks the script itself (tests)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--per-kernel", action="store_true",
                        help="also: µs per launch of each step kernel (torch.profiler) beside "
                             "benchmarks/perf_model.py's estimates, and µs per forward step")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        assert torch.cuda.is_available(), "needs a GPU (or --device cpu --smoke)"
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "gru_fused_cuda": gru_fused.cuda_compiled(), "fp32_precision": fp32_precision()}
    print("environment:", env, flush=True)
    shapes = [(28, 256, 32, 35)] + [(h, h, b, t) for h in (256, 1024) for b in (1, 32, 256)
                                     for t in (35, 256)]
    if args.quick:
        shapes = [(28, 256, 32, 35), (256, 256, 1, 256), (1024, 1024, 32, 35),
                  (1024, 1024, 256, 256)]
    if args.smoke:
        shapes = [(5, 8, 2, 3), (8, 8, 1, 4)]
    min_time = 0.01 if args.smoke else 0.05 if args.quick else 0.3
    rows = []
    for I, H, B, T in shapes:
        torch.manual_seed(0)
        nn_gru = torch.nn.GRU(I, H, device=dev)
        fused = gru_fused.FusedGRU(I, H, device=dev)
        fused.load_state_dict(nn_gru.state_dict())
        ref = Reference(nn_gru)
        x = torch.randn(T, B, I, device=dev)
        row = {"I": I, "H": H, "B": B, "T": T}
        for mode, bw in (("fwd", False), ("fwd+bwd", True)):
            for name, m in (("nn", nn_gru), ("fused", fused), ("reference", ref)):
                if name == "reference" and T * H > 256 * 256 and bw:
                    continue  # the Python loop's autograd graph is slow to time; skip the largest
                row[f"{mode} {name}"] = T * B / measure(layer_fns(m, x, bw), min_time)
        rows.append(row)
        print(f"I={I} H={H} B={B} T={T}: " + ", ".join(
            f"{k} {v:,.0f} tok/s" for k, v in row.items() if " " in k), flush=True)
    per_kernel = None
    if args.per_kernel:
        if dev.type != "cuda" or not gru_fused.cuda_compiled():
            parser.error("--per-kernel needs a GPU and gru_fused's CUDA kernels")
        text, per_kernel = per_kernel_table(dev)
        print(text, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows,
                                         "per_kernel": per_kernel}, indent=2))
    print()
    precision = env["fp32_precision"]
    print(f"Benchmark, float32, one layer ({env['device']}, torch {env['torch']}, cuDNN {env['cudnn']}; "
          f"cuDNN RNN fp32 precision {precision['cudnn_rnn']!r}, cuBLAS {precision['cuda_matmul']!r})")
    header = f"{'I':>5} {'H':>5} {'B':>4} {'T':>4} | {'fwd fused':>12} {'fwd nn':>12} {'x':>6} | {'f+b fused':>12} {'f+b nn':>12} {'x':>6} | {'f+b ref':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ref = r.get("fwd+bwd reference")
        print(f"{r['I']:>5} {r['H']:>5} {r['B']:>4} {r['T']:>4} | {r['fwd fused']:>12,.0f} {r['fwd nn']:>12,.0f} "
              f"{r['fwd fused'] / r['fwd nn']:>6.2f} | {r['fwd+bwd fused']:>12,.0f} {r['fwd+bwd nn']:>12,.0f} "
              f"{r['fwd+bwd fused'] / r['fwd+bwd nn']:>6.2f} | {ref if ref is None else format(ref, '12,.0f'):>12}")
    print("tokens/sec (T*B per call); x = FusedGRU / nn.GRU")


if __name__ == "__main__":
    main()
