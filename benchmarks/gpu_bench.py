"""GPU benchmark: FusedGRU vs torch.nn.GRU (cuDNN) vs the pure-PyTorch reference.

    python benchmarks/gpu_bench.py [--json OUT.json] [--quick]

One layer, float32, forward and forward+backward, torch.utils.benchmark (it synchronises
and warms up). Shapes: the book's time machine shape (I=28, H=256, B=32, T=35) and the
grid H in {256, 1024} x B in {1, 32, 256} x T in {35, 256} with I = H. Prints the
environment and one table: tokens/sec and the ratio FusedGRU / nn.GRU.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


def measure(fn, min_run_time):
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="short timings")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on any device: checks the script itself (tests)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        assert torch.cuda.is_available(), "needs a GPU (or --device cpu --smoke)"
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "gru_fused_cuda": gru_fused.cuda_compiled()}
    print("environment:", env)
    shapes = [(28, 256, 32, 35)] + [(h, h, b, t) for h in (256, 1024) for b in (1, 32, 256)
                                     for t in (35, 256)]
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
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    print()
    print(f"Benchmark, float32, one layer ({env['device']}, torch {env['torch']}, cuDNN {env['cudnn']})")
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
