"""A performance model of the CUDA step kernels on one H200: the plan until a GPU measures.

    python benchmarks/perf_model.py [--markdown]

For each kernel (block tiles from gru_fused._C.CUDA_TILES, i.e. csrc/cuda/gru_kernel_params.h)
at the book's shape (H=256, B=32) and at H=1024, B=64, fp32, it derives: the grid and its
waves, the rounds of dependent memory latency a block waits for, the shared-memory and L2
traffic of one launch, and from those a low and a high estimate of the launch's GPU time
(µs). Per-step rows add the launches of one step and set them beside cuDNN's published
figures (../shared/GPU_NOTES.md, in the docstring of CUDNN below). benchmarks/gpu_bench.py
--per-kernel prints measured µs per launch in the same layout (rows = kernel, columns =
shape), so the two can be compared line by line.

The model (every constant below is an assumption, marked as such in benchmarks/PERF_MODEL.md):
  time = max(latency path, throughput bound), plus a graph's launch gap (CUDA graph) or
         at least the host's launch cost (eager)
  latency path     = waves x (rounds x L2 latency + chunks x chunk compute + barriers + sums)
  throughput bound = max(L2 bytes / L2 bandwidth, shared wavefronts / (SMs x 1 per cycle),
                         FMAs / (SMs x 128 per cycle))
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# H200 (sm_90). Published: SMs, clock, FMA rate. Estimates: the rest (low, high).
SMS = 132
CLOCK_GHZ = 1.98
FMA_PER_CYCLE_PER_SM = 128
LDS_WAVEFRONTS_PER_CYCLE_PER_SM = 1          # 128 B per cycle
L2_LATENCY_CYCLES = (250, 450)               # unloaded .. under load
L2_BANDWIDTH_TBS = (7.0, 5.0)                # achievable read bandwidth, high .. low
BARRIER_CYCLES = 40                          # one __syncthreads with 8 warps
# A CUDA graph adds a gap between dependent kernels; eager launches cost the host 2-4 µs
# each, so a launch takes at least that long however short the kernel.
GRAPH_GAP_US = (0.6, 1.0)
EAGER_LAUNCH_US = (2.0, 4.0)
BLOCKS_PER_SM = 2                            # __launch_bounds__(256, 2); the table has 2-3

SHAPES = {"book (H=256, B=32)": (256, 32), "H=1024, B=64": (1024, 64)}

# cuDNN per layer-step, fp32, from GPU_NOTES.md's anchors (derived from PyTorch PR #62143
# and public benchmarks; **estimates** too): forward, backward.
CUDNN = {"book (H=256, B=32)": ("7-9", "8-12"), "H=1024, B=64": ("12-16", "8-20")}


def kernels(tiles: Dict) -> List[Dict]:
    """The launches of one step: each with its block tile (gru_fused._C.CUDA_TILES, fp32),
    its reduction length K in units of H, and the bytes its epilogue reads and writes per
    (b, j) element."""
    fused, reset, one = tiles["forward_fused[float]"], tiles["forward_reset[float]"], tiles["one_gate"]
    return [
        dict(name="forward fused (reset_after)", tile=fused, k=1, epi=4 * (3 + 1 + 1 + 4)),
        dict(name="forward reset_update (reset_before)", tile=reset, k=1, epi=4 * (2 + 1 + 3)),
        dict(name="forward candidate (reset_before)", tile=one, k=1, epi=4 * (1 + 2 + 1 + 4)),
        dict(name="backward gates (reset_after)", tile=one, k=3,
             epi=4 * (1 + 4 + 1 + 1 + 6 + 1)),
        dict(name="backward gates (reset_before)", tile=one, k=2,
             epi=4 * (1 + 4 + 1 + 1 + 2 + 1)),
        dict(name="backward reset_gate (reset_before)", tile=one, k=1,
             epi=4 * (2 + 1 + 1 + 1 + 1)),
    ]


def launch_model(kern: Dict, H: int, B: int) -> Dict:
    tile = kern["tile"]
    units, rows, G, K = tile["units"], tile["rows"], tile["gates"], kern["k"] * H
    grid = math.ceil(H / units) * math.ceil(B / rows)
    waves = math.ceil(grid / (SMS * BLOCKS_PER_SM))
    chunks = math.ceil(K / tile["chunk"])
    k_per_lane = tile["chunk"] // 32
    weight_rows_per_thread = G * tile["units_per_warp"]
    rounds = chunks + 1  # each chunk's loads, then the epilogue's reads
    # Per chunk and warp: rows x k_per_lane shared loads (one wavefront each, lanes read
    # consecutive words), weight_rows x rows x k_per_lane FMAs (4 warp-FMAs per cycle).
    lds_per_chunk = rows * k_per_lane
    fma_cycles_per_chunk = 8 * weight_rows_per_thread * rows * k_per_lane / 4
    chunk_cycles = max(8 * lds_per_chunk, fma_cycles_per_chunk)
    sums_cycles = G * 32 + 40  # a finisher's 32 partials per gate, 4 chains
    blocks_cycles = [waves * (rounds * lat + chunks * chunk_cycles
                              + (chunks + 2) * BARRIER_CYCLES + sums_cycles)
                     for lat in L2_LATENCY_CYCLES]
    # Traffic of one launch.
    w_bytes = 4 * G * H * K * math.ceil(B / rows)            # each weight row per row tile
    a_bytes = 4 * B * K * math.ceil(H / units)               # A rows per unit tile
    epi_bytes = kern["epi"] * B * H
    l2_bytes = w_bytes + a_bytes + epi_bytes
    wavefronts = grid * 8 * chunks * lds_per_chunk + grid * 8 * G * 32
    fmas = G * H * K * B
    bounds_us = [max(l2_bytes / (bw * 1e12) * 1e6,
                     wavefronts / (SMS * LDS_WAVEFRONTS_PER_CYCLE_PER_SM) / (CLOCK_GHZ * 1e3),
                     fmas / (SMS * FMA_PER_CYCLE_PER_SM) / (CLOCK_GHZ * 1e3))
                 for bw in L2_BANDWIDTH_TBS]
    gpu_us = [max(c / (CLOCK_GHZ * 1e3), b) for c, b in zip(blocks_cycles, bounds_us)]
    return dict(grid=grid, waves=waves, chunks=chunks, rounds=rounds,
                smem_mb=wavefronts * 128 / 2 ** 20, l2_mb=l2_bytes / 2 ** 20,
                gpu_us=tuple(gpu_us),
                bound="latency" if blocks_cycles[0] / (CLOCK_GHZ * 1e3) >= bounds_us[0]
                else "L2/shared throughput")


def rows_for(tiles: Dict) -> List[Dict]:
    out = []
    for kern in kernels(tiles):
        row = dict(name=kern["name"])
        for label, (H, B) in SHAPES.items():
            row[label] = launch_model(kern, H, B)
        out.append(row)
    return out


def fmt_range(lo: float, hi: float) -> str:
    return f"{lo:.1f}-{hi:.1f}"


def per_step(rows: List[Dict], names: List[str], label: str, mode: str) -> str:
    def launch(gpu: float, i: int) -> float:
        return gpu + GRAPH_GAP_US[i] if mode == "graph" else max(gpu, EAGER_LAUNCH_US[i])
    return fmt_range(*(sum(launch(r[label]["gpu_us"][i], i) for r in rows if r["name"] in names)
                       for i in (0, 1)))


def table(tiles: Dict) -> str:
    rows = rows_for(tiles)
    labels = list(SHAPES)
    lines = ["Per launch (fp32, estimated):", "",
             "| kernel | " + " | ".join(f"{l}: grid (waves), chunks, rounds, shared MB, "
                                          f"L2 MB, GPU µs, bound" for l in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for r in rows:
        cells = []
        for l in labels:
            m = r[l]
            cells.append(f"{m['grid']} ({m['waves']}), {m['chunks']}, {m['rounds']}, "
                         f"{m['smem_mb']:.1f}, {m['l2_mb']:.1f}, {fmt_range(*m['gpu_us'])}, "
                         f"{m['bound']}")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    steps = {
        "forward, reset_after": ["forward fused (reset_after)"],
        "forward, reset_before": ["forward reset_update (reset_before)",
                                  "forward candidate (reset_before)"],
        "backward, reset_after": ["backward gates (reset_after)"],
        "backward, reset_before": ["backward gates (reset_before)",
                                   "backward reset_gate (reset_before)"],
    }
    lines += ["", "Per step, µs (estimated; launch gaps included; the GEMMs before and after "
              "the loop not):", "",
              "| step | " + " | ".join(f"{l}: eager | {l}: CUDA graph | {l}: cuDNN"
                                       for l in labels) + " |",
              "|---|" + "---|" * (3 * len(labels))]
    for step, names in steps.items():
        cells = []
        for l in labels:
            cudnn = CUDNN[l][0 if step.startswith("forward") else 1]
            cells += [per_step(rows, names, l, "eager"), per_step(rows, names, l, "graph"),
                      cudnn if "reset_after" in step else "-"]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    import gru_fused._C as C
    if not getattr(C, "CUDA_COMPILED", False):
        print("gru_fused was built without CUDA kernels: no tiles to model", file=sys.stderr)
        return 1
    print(table(C.CUDA_TILES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
