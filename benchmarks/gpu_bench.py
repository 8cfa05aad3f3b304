"""GPU benchmark: FusedGRU vs torch.nn.GRU (cuDNN) vs the pure-PyTorch reference, and
gru_fused's kernel families side by side.

    python benchmarks/gpu_bench.py [--json OUT.json] [--quick] [--per-kernel] [--no-families]
    python benchmarks/gpu_bench.py --dry-run [--quick]     # the families table's plan, no GPU
    GRU_FUSED_CUDA_KERNEL=cluster python benchmarks/gpu_bench.py --check-family

One layer, forward and forward+backward, torch.utils.benchmark (it synchronises and warms
up). The first table: float32, the book's time machine shape (I=28, H=256, B=32, T=35)
and the grid H in {256, 1024} x B in {1, 32, 256} x T in {35, 256} with I = H; --quick:
the book's shape and three corners of the grid, with short timings. It prints the
environment (with the float32 precision cuDNN's RNNs and cuBLAS may use: PyTorch lets
cuDNN use TF32 by default, and that table keeps PyTorch's defaults): tokens/sec and the
ratio FusedGRU / nn.GRU, FusedGRU running the kernels auto picks.

The second table (the kernel families, issue 13): µs per step, forward and backward (the
backward: forward+backward minus forward; the GEMMs around the loop included), of the
step kernels (GRU_FUSED_CUDA_KERNEL=step), the persistent kernels (=persistent: the
cluster family where the device has clusters, else cooperative) and cuDNN, at the book's shape and H in {256,
1024} x B in {1, 8, 32, 256} x T in {35, 256}, float32 and bfloat16; strict float32 in the
float32 rows (TF32 off for cuDNN's RNNs and for cuBLAS, ours and cuDNN's alike). Beside them: the family auto picks
(gru_fused.cuda_kernel_plan), the kernels that ran (torch.profiler: a persistent launch the
device refuses falls back to the step kernels, which the table then shows, and the script
exits 3), and benchmarks/perf_model.py's estimates (eager step kernels; persistent kernels
amortised over T). --quick: FAMILY_QUICK_SHAPES.

--check-family (benchmarks/gpu_check.sh, before each family's tests): with the family that
GRU_FUSED_CUDA_KERNEL forces, a forward and backward at a few shapes, dtypes and both
formulas; exits 1 unless the kernels that ran (torch.profiler) are the planner's.
"""
import argparse
import contextlib
import json
import os
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


FAMILY_ENV = "GRU_FUSED_CUDA_KERNEL"
# The families the second table times, each with the GRU_FUSED_CUDA_KERNEL value that
# selects it (read by the C++ at every call).
FAMILIES = {"step": "step", "persistent": "persistent"}
FAMILY_SHAPES = ([(28, 256, 32, 35, dt) for dt in ("float32", "bfloat16")]
                 + [(H, H, B, T, dt) for H in (256, 1024) for B in (1, 8, 32, 256)
                    for T in (35, 256) for dt in ("float32", "bfloat16")])
FAMILY_QUICK_SHAPES = [(28, 256, 32, 35, "float32"), (28, 256, 32, 35, "bfloat16"),
                       (256, 256, 256, 35, "float32"), (1024, 1024, 32, 35, "float32"),
                       (1024, 1024, 1, 256, "float32")]


@contextlib.contextmanager
def kernel_family(value):
    """GRU_FUSED_CUDA_KERNEL=value for the duration (None: unset); restored after."""
    saved = os.environ.get(FAMILY_ENV)
    if value is None:
        os.environ.pop(FAMILY_ENV, None)
    else:
        os.environ[FAMILY_ENV] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(FAMILY_ENV, None)
        else:
            os.environ[FAMILY_ENV] = saved


@contextlib.contextmanager
def strict_fp32():
    """cuDNN's RNNs and cuBLAS's matmuls in IEEE float32 (no TF32) for the duration:
    torch.backends.cudnn.allow_tf32 = False, torch.backends.cuda.matmul.allow_tf32 = False,
    and the per-operation settings ('ieee') where this torch has them; restored after."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    per_op = hasattr(cudnn, "rnn") and hasattr(matmul, "fp32_precision")
    saved = (cudnn.allow_tf32, matmul.allow_tf32,
             (cudnn.rnn.fp32_precision, matmul.fp32_precision) if per_op else None)
    try:
        cudnn.allow_tf32, matmul.allow_tf32 = False, False
        if per_op:
            cudnn.rnn.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        got = fp32_precision()
        assert got == {"cudnn_rnn": "ieee", "cuda_matmul": "ieee"}, got
        yield got
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved[0], saved[1]
        if per_op:
            cudnn.rnn.fp32_precision, matmul.fp32_precision = saved[2]


def kernels_that_ran(run):
    """What one call of run launched of gru_fused's kernels: sorted "direction family"
    strings ("forward cluster", "backward step", ...), from torch.profiler's kernel names."""
    from torch.profiler import ProfilerActivity, profile

    import kernel_resources

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    ran = set()
    for avg in prof.key_averages():
        desc = kernel_resources.describe_kernel(avg.key)
        if desc is not None:
            ran.add(f"{desc['kind']} {desc['family']}")
    return sorted(ran)


def mismatches(plans, ran):
    """The directions whose planned family did not run (a refused persistent launch runs
    the step kernels instead): "forward: planned cluster, ran step" and the like."""
    out = []
    for d in ("forward", "backward"):
        want = plans[d]["family"]
        got = [r.split()[1] for r in ran if r.startswith(d + " ")]
        if got != [want]:
            out.append(f"{d}: planned {want}, ran {'+'.join(got) or 'nothing'}")
    return out


def family_plan(H, B, dtype, kernel, device=None, device_properties=None):
    """gru_fused.cuda_kernel_plan for this GPU (or device_properties): {"forward",
    "backward"} plans with that kernel choice (auto, persistent, ...)."""
    return gru_fused.cuda_kernel_plan(H, B, getattr(torch, dtype), True, device=device,
                                      kernel=kernel, device_properties=device_properties)


def model_estimates(H, B, T, dtype, persistent_plans):
    """benchmarks/perf_model.py's µs per step (lo, hi), by (direction, family): the step
    kernels eagerly, the persistent plan amortised over T (None where it has none)."""
    import perf_model

    import gru_fused._C as C

    tiles = C.CUDA_TILES
    scalar = getattr(torch, dtype).itemsize
    out = {}
    for d in ("forward", "backward"):
        out[(d, "step")] = perf_model.step_kernel_per_step(tiles, d, H, B, True, "eager")
        plan = persistent_plans[d]
        if plan["family"] == "step":
            out[(d, "persistent")] = None
        else:
            m = perf_model.persistent_model(tiles, plan, d, H, B, True, scalar)
            per_step, one_time = m["per_step_us"], m["one_time_us"]
            out[(d, "persistent")] = tuple(s + o / T for s, o in zip(per_step, one_time))
    return out


def plan_label(plans):
    """'cluster / cluster' (forward / backward) from cuda_kernel_plan's answer."""
    return " / ".join(plans[d]["family"] for d in ("forward", "backward"))


def family_row(I, H, B, T, dtype, dev, min_time):
    """One row of the families table, measured: µs per step forward and backward of each
    family and of cuDNN, the families that ran, auto's plan and the model's estimates."""
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    nn_gru = torch.nn.GRU(I, H, device=dev, dtype=dt)
    fused = gru_fused.FusedGRU(I, H, device=dev, dtype=dt)
    fused.load_state_dict(nn_gru.state_dict())
    x = torch.randn(T, B, I, device=dev, dtype=dt)

    def times(model):
        forward = measure(train_forward(model, x), min_time)
        both = measure(layer_fns(model, x, True), min_time)
        return {"forward": forward / T * 1e6, "backward": max(both - forward, 0.0) / T * 1e6}

    row = {"I": I, "H": H, "B": B, "T": T, "dtype": dtype,
           "auto": plan_label(family_plan(H, B, dtype, "auto")), "us": {}, "ran": {},
           "fell_back": []}
    persistent_plans = family_plan(H, B, dtype, "persistent")
    row["persistent_plan"] = plan_label(persistent_plans)
    # float32 rows: everyone in strict float32 (cuDNN's RNN, and the cuBLAS GEMMs around
    # our loop as around cuDNN's).
    with strict_fp32() if dt == torch.float32 else contextlib.nullcontext():
        for family, value in FAMILIES.items():
            with kernel_family(value):
                row["us"][family] = times(fused)
                row["ran"][family] = kernels_that_ran(layer_fns(fused, x, True))
                row["fell_back"] += [f"{family} column: {m}" for m in mismatches(
                    family_plan(H, B, dtype, value), row["ran"][family])]
        try:
            row["us"]["cudnn"] = times(nn_gru)
        except RuntimeError as e:  # a dtype cuDNN's RNN does not take
            row["us"]["cudnn"] = None
            row["cudnn_error"] = str(e).splitlines()[0]
    row["model"] = {f"{d} {f}": v for (d, f), v in
                    model_estimates(H, B, T, dtype, persistent_plans).items()}
    return row


def train_forward(model, x):
    """A forward with autograd recording (what a training step's forward costs)."""
    def run():
        model(x)
    return run


def family_table(rows):
    """The families table, Markdown, from family_row's rows (measured or not: a missing
    figure prints as -)."""
    def us(v):
        return "-" if v is None else f"{v:.1f}"

    def est(v):
        return "-" if v is None else f"{v[0]:.1f}-{v[1]:.1f}"

    lines = ["Kernel families, µs per step (measured; the model's estimate in brackets, "
             "estimated): step kernels, persistent kernels, cuDNN (strict float32 in the "
             "float32 rows)", "",
             "| I, H, B, T, dtype | auto picks (fwd / bwd) | ran (persistent column) "
             "| fwd: step | fwd: persistent | fwd: cuDNN | bwd: step | bwd: persistent "
             "| bwd: cuDNN |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r['I']}, {r['H']}, {r['B']}, {r['T']}, {r['dtype']}", r["auto"],
                 ", ".join(r["ran"].get("persistent", [])) or "-"]
        for d in ("forward", "backward"):
            for family in ("step", "persistent", "cudnn"):
                got = (r["us"].get(family) or {}).get(d)
                model = r["model"].get(f"{d} {family}")
                cells.append(us(got) + ("" if family == "cudnn" else f" ({est(model)})"))
        lines.append("| " + " | ".join(cells) + " |")
    fell = [r for r in rows if r.get("fell_back")]
    if fell:
        lines += ["", "NOT AS PLANNED (a refused persistent launch falls back to the step "
                  "kernels): " + "; ".join(f"H={r['H']} B={r['B']} T={r['T']} {r['dtype']}: "
                                           f"{', '.join(r['fell_back'])}" for r in fell)]
    return "\n".join(lines)


def check_family(dev):
    """--check-family: the kernels that run under GRU_FUSED_CUDA_KERNEL are the ones the
    planner (gru_fused.cuda_kernel_plan) names; 0 if so, else 1."""
    choice = os.environ.get(FAMILY_ENV) or "auto"
    bad, lines = [], []
    for H, B in ((37, 9), (256, 32)):
        for dtype in ("float32", "bfloat16"):
            for reset_after in (True, False):
                torch.manual_seed(0)
                dt = getattr(torch, dtype)
                model = gru_fused.FusedGRU(H, H, device=dev, dtype=dt, reset_after=reset_after)
                x = torch.randn(5, B, H, device=dev, dtype=dt)
                plans = gru_fused.cuda_kernel_plan(H, B, dt, reset_after, device=dev)
                ran = kernels_that_ran(layer_fns(model, x, True))
                where = f"H={H} B={B} {dtype} reset_after={reset_after}"
                lines.append(f"{where}: planned {plan_label(plans)}, ran {', '.join(ran)}")
                bad += [f"{where}: {m}" for m in mismatches(plans, ran)]
    print(f"{FAMILY_ENV}={choice}:")
    print("\n".join("  " + line for line in lines))
    if choice in ("cluster", "cooperative") and "planned step" in " ".join(lines):
        print(f"note: the planner runs the step kernels for some of these under {choice} on "
              f"this device: {torch.cuda.get_device_name(dev)}")
    if bad:
        print("NOT AS PLANNED:\n" + "\n".join("  " + b for b in bad))
        return 1
    print("check-family: every call ran the planned kernels")
    return 0


def dry_run_rows(shapes):
    """The families table's rows without a GPU: plans for an H200 (perf_model's
    H200_PROPERTIES), the model's estimates, nothing measured."""
    import perf_model

    rows = []
    for I, H, B, T, dtype in shapes:
        props = perf_model.H200_PROPERTIES
        persistent = family_plan(H, B, dtype, "persistent", device_properties=props)
        rows.append({"I": I, "H": H, "B": B, "T": T, "dtype": dtype,
                     "auto": plan_label(family_plan(H, B, dtype, "auto", device_properties=props)),
                     "persistent_plan": plan_label(persistent), "us": {}, "ran": {},
                     "model": {f"{d} {f}": v for (d, f), v in
                               model_estimates(H, B, T, dtype, persistent).items()}})
    return rows


def per_kernel_table(dev):
    """Measured µs per launch of each step kernel at the performance model's shapes,
    fp32, in benchmarks/perf_model.py's layout, the model's estimate beside each; and
    µs per step of a whole forward (eager and replayed from a CUDA graph). The step
    kernels are forced (GRU_FUSED_CUDA_KERNEL=step), whatever auto picks."""
    with kernel_family("step"):
        return _per_kernel_table(dev)


def _per_kernel_table(dev):
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
    parser.add_argument("--no-families", action="store_true",
                        help="skip the kernel families table (step, persistent, cuDNN)")
    parser.add_argument("--check-family", action="store_true",
                        help="check that the family GRU_FUSED_CUDA_KERNEL forces is the one "
                             "that runs (exit 1 if not), and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the families table's rows (H200 plans, the model's "
                             "estimates) without a GPU, and exit")
    args = parser.parse_args()
    family_shapes = FAMILY_QUICK_SHAPES if args.quick else FAMILY_SHAPES
    if args.dry_run:
        print(family_table(dry_run_rows(family_shapes)))
        return 0
    dev = torch.device(args.device)
    if dev.type == "cuda":
        assert torch.cuda.is_available(), "needs a GPU (or --device cpu --smoke)"
    if args.check_family:
        assert dev.type == "cuda" and gru_fused.cuda_compiled(), "needs a GPU and a CUDA build"
        return check_family(dev)
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
    families = None
    if dev.type == "cuda" and gru_fused.cuda_compiled() and not args.no_families:
        families = []
        for I, H, B, T, dtype in family_shapes:
            families.append(family_row(I, H, B, T, dtype, dev,
                                       0.05 if args.quick else 0.1))
            r = families[-1]
            print(f"families I={I} H={H} B={B} T={T} {dtype}: " + ", ".join(
                f"{f} {v['forward']:.1f}/{v['backward']:.1f} µs" for f, v in r["us"].items()
                if v) + f"; ran {r['ran']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows,
                                         "per_kernel": per_kernel, "families": families},
                                        indent=2))
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
    if families is not None:
        print()
        print(family_table(families))
        if any(r["fell_back"] for r in families):
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
