"""A performance model of the CUDA kernels on one H200: the plan until a GPU measures.

    python benchmarks/perf_model.py [--step-only] [--update-doc]

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

Then the persistent kernels (issue 13; --step-only leaves them out, printing the step
kernels' tables alone, as before): for each plan the planner makes for an H200
(gru_fused.cuda_kernel_plan) at H=256, B in {1, 8, 32, 256} and H=1024, B in {1, 32, 64,
256}, µs per step forward and backward, beside the step kernels' and cuDNN's:
  per step  = sum over the step's phases of (tiles per CTA x tile + exchange + barrier)
  tile      = first chunk + chunks x max(shared wavefronts, FMAs, issue; cooperative: and
              the L2 latency of A) + barriers + partial sums (shared wavefronts of all 8
              warps) + the epilogue's exposed L2 round trip
  exchange  = cluster: DSMEM latency + the stores' sectors not hidden behind later tiles
  barrier   = cluster barrier or grid barrier
  one-time  = launch + W_hh's slices loaded (per-thread round trips or HBM bandwidth)
              + the backward's final grad_hx phase, amortised over T = 35 and 256
and what-ifs at the book's shape (changes to the kernels, priced by the same model).
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


# ---------------------------------------------------------------------------------------
# The persistent kernels (issue 13, csrc/cuda/gru_persistent.cuh): one launch per call, W_hh
# (backward: W_hh^T) in shared memory for the whole sequence. Their geometry is the
# planner's (gru_fused.cuda_kernel_plan, i.e. csrc/cuda/gru_persistent_plan.h), never
# restated here; the model below prices what one CTA does per step with that geometry.
#
# Per phase (one per step; two for reset_before) a CTA runs its tiles one after another,
# each tile = block_matmul (the same code as the step kernels: chunks of k, the next
# chunk's loads before the current chunk's FMAs, one barrier per chunk, then the partial
# sums through shared memory) + the epilogue (gate math; it reads gi / the saved gates from
# global memory after the matmul: one exposed L2 round trip per tile, as the SASS shows),
# then the exchange (cluster: every finished element stored into all C CTAs' shared memory
# through DSMEM) and the barrier (cluster barrier; cooperative: grid barrier).
#
# Every constant below is an assumption (benchmarks/PERF_MODEL.md has the table); every
# number the model prints is an estimate. (lo, hi) pairs: optimistic, pessimistic.
H200_PROPERTIES = dict(cc=(9, 0), sm_count=132, smem_per_block_optin=232448, cooperative=True,
                       clusters=True)   # cudaDeviceGetAttribute's values (vendor specification)
A100_PROPERTIES = dict(cc=(8, 0), sm_count=108, smem_per_block_optin=166912, cooperative=True,
                       clusters=False)
BOOK = (256, 32)
PERSISTENT_SHAPES = [(256, 1), (256, 8), (256, 32), (256, 256),
                     (1024, 1), (1024, 32), (1024, 64), (1024, 256)]
SEQUENCE_LENGTHS = (35, 256)                 # the one-time costs, amortised over T steps
SHARED_LATENCY_CYCLES = 30                   # a shared-memory load (estimate)
DSMEM_LATENCY_CYCLES = (180, 250)            # a remote (DSMEM) store reaching its peer (estimate)
# The exchange's remote stores are uncoalesced: a finisher lane per (unit, row), rows
# H (or 3H) elements apart, so each store instruction is one 32-byte sector per row.
DSMEM_CYCLES_PER_SECTOR = (1.0, 2.5)         # per SM, SM-to-SM network (estimate)
CLUSTER_BARRIER_US = (0.3, 0.6)              # barrier.cluster incl. its GPU-scope fence (estimate)
GRID_BARRIER_US = (1.0, 2.0)                 # cooperative grid.sync over ~32-132 CTAs (estimate)
EPILOGUE_L2_ROUNDS = 1                       # gi / saved gates read after the matmul (SASS)
HBM_LATENCY_CYCLES = (500, 800)              # W_hh's first load, L2 or HBM (estimate)
HBM_BANDWIDTH_TBS = (4.0, 3.0)               # achievable of the H200's 4.8 TB/s (estimate)
W_LOADS_IN_FLIGHT = 16                       # load_rows unrolled by 16 (SASS, sm_90)


def h200_plan(H: int, B: int, dtype=None, reset_after: bool = True,
              device_properties=None) -> Dict:
    """The planner's plans ({"forward", "backward"}) for an H200 (or device_properties),
    chosen as GRU_FUSED_CUDA_KERNEL=persistent would: the persistent kernels' geometry
    (auto runs the step kernels for now)."""
    import torch

    import gru_fused
    return gru_fused.cuda_kernel_plan(H, B, dtype or torch.float32, reset_after, kernel="persistent",
                                      device_properties=device_properties or H200_PROPERTIES)


def persistent_phases(tiles: Dict, direction: str, reset_after: bool) -> List[Dict]:
    """The phases of one step of a persistent kernel: tile, reduction length K (in units of
    H) and the values each finished (unit, row) element sends to the cluster."""
    fused, reset, one = tiles["forward_fused[float]"], tiles["forward_reset[float]"], tiles["one_gate"]
    if direction == "forward":
        if reset_after:
            return [dict(name="fused", tile=fused, k=1, values=1)]          # h
        return [dict(name="reset_update", tile=reset, k=1, values=1),     # r h
                dict(name="candidate", tile=one, k=1, values=1)]          # h
    if reset_after:
        return [dict(name="gates", tile=one, k=3, values=3)]              # dr, dz, dgh_n
    return [dict(name="gates", tile=one, k=2, values=2),                  # dz, dn
            dict(name="reset_gate", tile=one, k=1, values=1)]             # dr


def tile_cycles(tile: Dict, K: int, cluster: bool, i: int, prefetch: bool = False,
                shuffle_sums: bool = False) -> float:
    """One tile of block_matmul plus its epilogue, in cycles of the SM it runs on (one CTA of
    8 warps per SM: the warps share the SM's shared-memory pipe and FMA units). prefetch,
    shuffle_sums: what-ifs, not what the kernels do (see what_if_rows)."""
    R, kpl = tile["rows"], tile["chunk"] // 32
    WR, G = tile["gates"] * tile["units_per_warp"], tile["gates"]
    chunks = math.ceil(K / tile["chunk"])
    a_loads = R * tile["chunk"] // 256  # the A tile values a thread copies per chunk
    # Per warp and chunk, shared-memory wavefronts: the A tile (R per k), W from shared
    # memory (WR per k), the A tile's store, and (cluster) the A source's load: the state
    # buffer is shared memory too, copied into the tile.
    wavefronts = R * kpl + WR * kpl + a_loads + (a_loads if cluster else 0)
    fmas = WR * R * kpl
    chunk = max(8 * wavefronts, 8 * fmas / 4, 8 * (wavefronts + fmas) / 4)
    if cluster:
        first = SHARED_LATENCY_CYCLES
    else:  # A (h or the gate gradients) comes from L2: each chunk waits for its loads
        first = L2_LATENCY_CYCLES[i]
        chunk = max(chunk, L2_LATENCY_CYCLES[i])
    barriers = (chunks + 2) * BARRIER_CYCLES
    # The partial sums: every warp stores its kOutputs x 32 partials, then 8 (of 32) lanes
    # per warp read 32 partials per gate, one wavefront per load.
    sums = max(8 * (WR * R + G * 32), G * 32 + 40)
    if shuffle_sums:  # what-if: a transposing warp-shuffle reduction, ~1 shuffle per output
        sums = 8 * WR * R + 40
    epilogue = (0 if prefetch else EPILOGUE_L2_ROUNDS) * L2_LATENCY_CYCLES[i]
    return first + chunks * chunk + barriers + sums + epilogue


def persistent_model(tiles: Dict, plan: Dict, direction: str, H: int, B: int,
                     reset_after: bool = True, scalar_bytes: int = 4, **what_if) -> Dict:
    """µs per step (lo, hi) of one persistent plan, its one-time cost (µs: the W_hh load, the
    launch, the backward's final grad_hx phase) and the parts of a step, all estimated.
    what_if: tile_cycles' prefetch / shuffle_sums (hypothetical kernels, what_if_rows)."""
    family = plan["family"]
    assert family in ("cluster", "cooperative"), plan
    cluster = family == "cluster"
    C, units = plan["cluster"], plan["units"]
    rows = plan["rows"] if cluster else B
    ctas = C * plan["clusters"]
    ghz = CLOCK_GHZ * 1e3  # cycles per µs
    phases = persistent_phases(tiles, direction, reset_after)
    epi = {k["name"]: k["epi"] for k in kernels(tiles)}
    step_epi = sum(epi[n] for n in (
        ["forward fused (reset_after)"] if direction == "forward" and reset_after else
        ["forward reset_update (reset_before)", "forward candidate (reset_before)"]
        if direction == "forward" else
        ["backward gates (reset_after)"] if reset_after else
        ["backward gates (reset_before)", "backward reset_gate (reset_before)"]))
    per_step, parts = [], []
    for i in (0, 1):
        total, detail = 0.0, []
        for ph in phases:
            tile, K = ph["tile"], ph["k"] * H
            n_tiles = math.ceil(units / tile["units"]) * math.ceil(rows / tile["rows"])
            compute = n_tiles * tile_cycles(tile, K, cluster, i, **what_if)
            exchange = 0.0
            if cluster:
                # One 32-byte sector per (row, unit group of a finisher) per peer CTA.
                sectors = math.ceil(units / tile["units_per_warp"]) * rows * ph["values"] * C
                drain = sectors * DSMEM_CYCLES_PER_SECTOR[i]
                # Stores drain while the CTA's later tiles compute; the last tile's are
                # exposed, and the barrier waits for them to land.
                exchange = max(drain - compute * (n_tiles - 1) / n_tiles, drain / n_tiles) \
                    + DSMEM_LATENCY_CYCLES[i]
                barrier = CLUSTER_BARRIER_US[i]
                floor_us = 0.0
            else:
                barrier = GRID_BARRIER_US[i]
                # Every CTA reads all B rows of A once per unit tile: an L2 traffic floor.
                a_bytes = ctas * math.ceil(units / tile["units"]) * B * K * scalar_bytes
                floor_us = a_bytes / (L2_BANDWIDTH_TBS[i] * 1e12) * 1e6
            phase_us = max((compute + exchange) / ghz, floor_us) + barrier
            detail.append(dict(phase=ph["name"], tiles=n_tiles, compute_us=compute / ghz,
                               exchange_us=exchange / ghz, barrier_us=barrier,
                               l2_floor_us=floor_us))
            total += phase_us
        # The step's global writes (output, saved gates): a floor too, rarely binding.
        total = max(total, step_epi * B * H / (L2_BANDWIDTH_TBS[i] * 1e12) * 1e6)
        per_step.append(total)
        parts.append(detail)
    # One time per call: the launch, W_hh's slices (per thread, W_LOADS_IN_FLIGHT loads per
    # round trip; or HBM bandwidth), the backward's final grad_hx phase.
    one_time = []
    w_per_thread = math.ceil(units * 3 * H / 256)
    w_total = ctas * units * 3 * H * scalar_bytes
    for i in (0, 1):
        load = max(math.ceil(w_per_thread / W_LOADS_IN_FLIGHT) * HBM_LATENCY_CYCLES[i] / ghz,
                   w_total / (HBM_BANDWIDTH_TBS[i] * 1e12) * 1e6)
        final = 0.0
        if direction == "backward":
            one = tiles["one_gate"]
            n_tiles = math.ceil(units / one["units"]) * math.ceil(rows / one["rows"])
            final = n_tiles * tile_cycles(one, (3 if reset_after else 2) * H, cluster, i,
                                           **what_if) / ghz
        one_time.append(EAGER_LAUNCH_US[i] + load + final
                        + (CLUSTER_BARRIER_US[i] if cluster else 0.0))
    return dict(family=family, ctas=ctas, per_step_us=tuple(per_step),
                one_time_us=tuple(one_time), parts=parts,
                amortised_us={T: tuple(s + o / T for s, o in zip(per_step, one_time))
                              for T in SEQUENCE_LENGTHS})


def step_kernel_per_step(tiles: Dict, direction: str, H: int, B: int, reset_after: bool,
                         mode: str) -> tuple:
    """The step kernels' µs per step (lo, hi) at any shape, as the table above computes it."""
    names = {("forward", True): ["forward fused (reset_after)"],
             ("forward", False): ["forward reset_update (reset_before)",
                                  "forward candidate (reset_before)"],
             ("backward", True): ["backward gates (reset_after)"],
             ("backward", False): ["backward gates (reset_before)",
                                   "backward reset_gate (reset_before)"]}[(direction, reset_after)]
    models = [launch_model(k, H, B) for k in kernels(tiles) if k["name"] in names]
    if mode == "graph":
        return tuple(sum(m["gpu_us"][i] + GRAPH_GAP_US[i] for m in models) for i in (0, 1))
    return tuple(sum(max(m["gpu_us"][i], EAGER_LAUNCH_US[i]) for m in models) for i in (0, 1))


def cudnn_anchor(H: int, B: int, direction: str) -> str:
    for label, shape in SHAPES.items():
        if shape == (H, B):
            return CUDNN[label][0 if direction == "forward" else 1]
    return "-"


def plan_text(plan: Dict) -> str:
    if plan["family"] == "step":
        return "step"
    if plan["family"] == "cluster":
        return (f"cluster: {plan['clusters']} of {plan['cluster']} CTAs, {plan['units']} units x "
                f"{plan['rows']} rows, {plan['smem'] / 1024:.0f} KB")
    return (f"cooperative: {plan['cluster']} CTAs, {plan['units']} units x {plan['rows']} rows, "
            f"{plan['smem'] / 1024:.0f} KB")


def plans_table() -> str:
    """The planner's plans at the book's shape on an H200 and an A100 (device properties
    as cudaDeviceGetAttribute reports them), reset_after, float32 and bfloat16."""
    import torch

    H, B = BOOK
    lines = [f"Plans at the book's shape (H={H}, B={B}, reset_after; "
             "gru_fused.cuda_kernel_plan, GRU_FUSED_CUDA_KERNEL=persistent):", "",
             "| device | dtype | direction | family | grid | per CTA: units x rows "
             "| shared memory per CTA | why |", "|---|---|---|---|---|---|---|---|"]
    for device, props in (("H200", H200_PROPERTIES), ("A100", A100_PROPERTIES)):
        for dt in (torch.float32, torch.bfloat16):
            plans = h200_plan(H, B, dt, True, device_properties=props)
            for d, p in plans.items():
                grid = (f"{p['clusters']} clusters x {p['cluster']} CTAs"
                        if p["family"] == "cluster" else f"{p['cluster']} CTAs")
                lines.append(f"| {device} | {str(dt).replace('torch.', '')} | {d} | {p['family']} "
                             f"| {grid} | {p['units']} x {p['rows']} | {p['smem'] / 1024:.1f} KB "
                             f"| {p['why']} |")
    return "\n".join(lines)


def persistent_rows(tiles: Dict, reset_after: bool = True) -> List[Dict]:
    """One row per (H, B, dtype) of PERSISTENT_SHAPES: the H200 plans and the model's
    estimates, forward and backward, beside the step kernels' and cuDNN's. bfloat16 rows
    only where the planner's geometry differs from float32's."""
    import torch

    def geometry(p):
        return tuple(p[k] for k in ("family", "cluster", "units", "rows", "clusters"))

    out = []
    for H, B in PERSISTENT_SHAPES:
        plans = {dt: h200_plan(H, B, dt, reset_after) for dt in (torch.float32, torch.bfloat16)}
        for dt, plan in plans.items():
            if dt != torch.float32 and all(geometry(plan[d]) == geometry(plans[torch.float32][d])
                                           for d in plan):
                continue
            row = dict(H=H, B=B, dtype=str(dt).replace("torch.", ""), plans=plan)
            for d in ("forward", "backward"):
                row[d] = dict(
                    plan=plan[d],
                    step_eager=step_kernel_per_step(tiles, d, H, B, reset_after, "eager"),
                    step_graph=step_kernel_per_step(tiles, d, H, B, reset_after, "graph"),
                    persistent=(persistent_model(tiles, plan[d], d, H, B, reset_after,
                                                 dt.itemsize)
                                if plan[d]["family"] != "step" else None),
                    cudnn=cudnn_anchor(H, B, d) if reset_after else "-")
            out.append(row)
    return out


def what_if_rows(tiles: Dict) -> List[Dict]:
    """Hypothetical changes to the persistent kernels at the book's shape (float32,
    reset_after), each on top of the one before: what the model says they would buy. Not
    what the kernels or the planner do today."""
    H, B = BOOK
    plans = h200_plan(H, B)
    rows = [dict(change="as built (the planner's plans)", plans=plans, tiles=tiles, opts={}),
            dict(change="+ gi and the saved gates loaded before the matmul (no exposed L2 "
                 "round trip per tile)", plans=plans, tiles=tiles, opts=dict(prefetch=True)),
            dict(change="+ partial sums by warp shuffles (no shared-memory round trip)",
                 plans=plans, tiles=tiles, opts=dict(prefetch=True, shuffle_sums=True))]
    # 4-row forward tiles: 128 CTAs of 16 units x 4 rows (8 clusters of 16) instead of 64
    # CTAs of 16 units x 8 rows.
    wide = {d: dict(plans[d], cluster=16, units=math.ceil(H / 16), rows=4,
                    clusters=math.ceil(B / 4)) for d in plans}
    four_rows = dict(tiles, **{"forward_fused[float]": dict(tiles["forward_fused[float]"], rows=4)})
    rows.append(dict(change="+ 4-row forward tiles (128 CTAs of 16 units x 4 rows)", plans=wide,
                     tiles=four_rows, opts=dict(prefetch=True, shuffle_sums=True)))
    for r in rows:
        for d in ("forward", "backward"):
            r[d] = persistent_model(r["tiles"], r["plans"][d], d, H, B, True, **r["opts"])
    return rows


def persistent_table(tiles: Dict) -> str:
    lines = ["", plans_table()]
    for reset_after in (True, False):
        formula = "reset_after" if reset_after else "reset_before"
        rows = persistent_rows(tiles, reset_after)
        for d in ("forward", "backward"):
            lines += ["", f"Persistent kernels, {d}, {formula}, H200 plans from "
                      f"gru_fused.cuda_kernel_plan; µs per step (estimated):", "",
                      "| H, B, dtype | plan (persistent) | step kernels: eager | step kernels: CUDA graph "
                      "| persistent: per step | persistent: one-time | persistent at T=35 "
                      "| persistent at T=256 | cuDNN |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                m = r[d]
                p = m["persistent"]
                cells = [plan_text(m["plan"]), fmt_range(*m["step_eager"]),
                         fmt_range(*m["step_graph"])]
                if p is None:
                    cells += ["-"] * 4
                else:
                    cells += [fmt_range(*p["per_step_us"]), fmt_range(*p["one_time_us"])]
                    cells += [fmt_range(*p["amortised_us"][T]) for T in SEQUENCE_LENGTHS]
                cells.append(m["cudnn"])
                lines.append(f"| {r['H']}, {r['B']}, {r['dtype']} | " + " | ".join(cells) + " |")
            if all(r["dtype"] == "float32" for r in rows):
                lines += ["", "bfloat16: the planner's geometry is float32's at every shape here "
                          "(half the shared memory), and so is the model's estimate (FP32 FMAs, "
                          "the same shared-memory instructions)."]
    # Where a step goes at the book's shape.
    H, B = BOOK
    plans = h200_plan(H, B)
    lines += ["", f"Where a persistent step goes at the book's shape (H={H}, B={B}, float32, "
              "reset_after; estimated, µs, lo-hi):", "",
              "| direction | phase | tiles per CTA | tiles (compute) | exchange | barrier |",
              "|---|---|---|---|---|---|"]
    for d in ("forward", "backward"):
        m = persistent_model(tiles, plans[d], d, H, B, True)
        for lo, hi in zip(*m["parts"]):
            lines.append(f"| {d} | {lo['phase']} | {lo['tiles']} | "
                         f"{fmt_range(lo['compute_us'], hi['compute_us'])} | "
                         f"{fmt_range(lo['exchange_us'], hi['exchange_us'])} | "
                         f"{fmt_range(lo['barrier_us'], hi['barrier_us'])} |")
    lines += ["", f"What-ifs at the book's shape (hypothetical kernels, each row on top of the "
              "one above; estimated µs per step, T=35 amortised):", "",
              "| change | forward | backward |", "|---|---|---|"]
    for r in what_if_rows(tiles):
        lines.append(f"| {r['change']} | " + " | ".join(
            fmt_range(*r[d]["amortised_us"][35]) for d in ("forward", "backward")) + " |")
    return "\n".join(lines).lstrip("\n")


DOC = Path(__file__).resolve().parent / "PERF_MODEL.md"


def update_doc(tiles: Dict, path: Path = DOC) -> bool:
    """Rewrites the generated tables of PERF_MODEL.md (between its "<!-- perf_model.py:
    step -->" / "persistent" markers and "<!-- /perf_model.py -->"); True if it changed."""
    import re

    text = path.read_text()
    new = text
    for name, body in (("step", table(tiles)), ("persistent", persistent_table(tiles))):
        pattern = re.compile(r"(<!-- perf_model\.py: %s -->\n).*?(\n<!-- /perf_model\.py -->)"
                             % name, re.S)
        assert pattern.search(new), f"{path}: no {name} markers"
        new = pattern.sub(lambda m: m.group(1) + body + m.group(2), new)
    if new != text:
        path.write_text(new)
    return new != text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-only", action="store_true",
                        help="only the step kernels' tables (the model before issue 13)")
    parser.add_argument("--update-doc", action="store_true",
                        help="also rewrite the generated tables in benchmarks/PERF_MODEL.md")
    args = parser.parse_args(argv)
    import gru_fused._C as C
    if not getattr(C, "CUDA_COMPILED", False):
        print("gru_fused was built without CUDA kernels: no tiles to model", file=sys.stderr)
        return 1
    if args.update_doc:
        print(f"{DOC}: {'updated' if update_doc(C.CUDA_TILES) else 'already current'}",
              file=sys.stderr)
    print(table(C.CUDA_TILES))
    if not args.step_only:
        print()
        print(persistent_table(C.CUDA_TILES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
