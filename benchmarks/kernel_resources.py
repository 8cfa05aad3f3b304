"""What the compiler made of the CUDA kernels, read from the built extension.

    python benchmarks/kernel_resources.py [--arch sm_90] [--so PATH]

Runs `cuobjdump --dump-resource-usage` on gru_fused/_C*.so (torch's triton package ships
a cuobjdump; so does the pip package nvidia-cuda-cuobjdump, or a CUDA toolkit) and prints
one Markdown row per kernel: registers, stack, local memory, the dynamic shared memory
its launch asks for, and the theoretical occupancy on an H200 (sm_90). Step kernels: their
block tile and shared memory from gru_fused._C.CUDA_TILES (csrc/cuda/gru_tiles.h).
Persistent kernels (csrc/cuda/gru_persistent.cuh; family cluster or cooperative): their
geometry and shared memory depend on the call's shape, so the row shows the planner's
plan at the book's shape (H=256, B=32) on an H200 (gru_fused.cuda_kernel_plan with
H200_PROPERTIES and that family forced). tests/test_resources.py uses the same parser to
fail on any stack or local memory.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's gru_fused, installed or not

# sm_90 (H100, H200): per SM 64K registers, 2048 threads, 32 blocks, 228 KB of shared
# memory of which a block may take 227 KB (1 KB per block is reserved by the system).
SM90 = dict(regs=65536, threads=2048, blocks=32, smem=233472, smem_reserved=1024,
            reg_unit=256)
# An H200 as the planner sees it (cudaDeviceGetAttribute's values), and the shape at which
# the persistent kernels' rows show their plan.
H200_PROPERTIES = dict(cc=(9, 0), sm_count=132, smem_per_block_optin=232448, cooperative=True,
                       clusters=True)
PLAN_SHAPE = (256, 32)


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from PATH, CUDA_HOME, the triton package, or nvidia-cuda-cuobjdump."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))
    except ImportError:
        pass
    try:
        import nvidia
        for base in nvidia.__path__:
            candidates += glob.glob(os.path.join(base, "**", "bin", "cuobjdump"), recursive=True)
    except ImportError:
        pass
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def extension_path() -> str:
    import gru_fused._C as C
    return C.__file__


def demangle(names: List[str]) -> Dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def parse_resource_usage(dump: str) -> List[Dict]:
    """The per-function lines of `cuobjdump --dump-resource-usage`: one dict per (arch,
    function) with the mangled name and every KEY:value field as an int."""
    rows, arch, name = [], None, None
    for line in dump.splitlines():
        m = re.match(r"\s*arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name is not None and "REG:" in line:
            fields = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            rows.append(dict(arch=arch, mangled=name, **fields))
            name = None
    return rows


PHASES = {"forward": ["fused", "reset_update", "candidate"],   # ForwardPhase's order
          "backward": ["gates", "reset_gate", "final"]}        # BackwardPhase's order


def describe_kernel(demangled: str) -> Optional[Dict]:
    """kind, dtype, accumulate type, formula and phase of a step kernel's demangled name
    (as c++filt or the profiler prints it), or of a persistent kernel's (phase
    "persistent", family "cluster" or "cooperative"), or None for any other name."""
    m = re.search(r"(forward|backward)_persistent_kernel<([^,]+), ([^,]+), (true|false), "
                  r"(true|false)>", demangled)
    if m is not None:
        kind, scalar, acc, reset_after, cluster = m.groups()
        family = "cluster" if cluster == "true" else "cooperative"
        formula = "reset_after" if reset_after == "true" else "reset_before"
        return dict(kind=kind, dtype=scalar.replace("c10::", ""), acc=acc,
                    reset_after=reset_after == "true", phase="persistent", family=family,
                    phase_index=len(PHASES[kind]) + (family == "cooperative"),
                    label=f"{kind} persistent {family} ({formula})")
    m = re.search(r"(forward|backward)_step_kernel<([^,]+), ([^,]+), (true|false), "
                  r"\(?(?:gru_fused::cuda::)?\w+\)?(\d+)>", demangled)
    if m is None:
        return None
    kind, scalar, acc, reset_after, index = m.groups()
    phase = PHASES[kind][int(index)]
    formula = "reset_after" if reset_after == "true" else "reset_before"
    return dict(kind=kind, dtype=scalar.replace("c10::", ""), acc=acc,
                reset_after=reset_after == "true", phase=phase, family="step",
                phase_index=int(index), label=f"{kind} {phase} ({formula})")


def gru_kernels(rows: List[Dict]) -> List[Dict]:
    """The gru_fused kernels among rows, with their demangled name, dtype, formula, phase
    and family (step, cluster, cooperative)."""
    mine = [r for r in rows if "gru_fused" in r["mangled"]]
    names = demangle(sorted({r["mangled"] for r in mine}))
    out = []
    for r in mine:
        row = dict(r, name=names[r["mangled"]])
        row.update(describe_kernel(row["name"]) or {})
        out.append(row)
    return out


# Registers a thread may use: __launch_bounds__(256, 2) for the step kernels (two blocks
# per SM: 65536 / 512), __launch_bounds__(256, 1) for the persistent ones (one CTA per SM;
# the architecture's 255).
MAX_REGISTERS = {"step": 128, "cluster": 255, "cooperative": 255}


def register_problems(kernels: List[Dict]) -> List[str]:
    """Every kernel over its launch bounds' registers (or of no known family): one line
    each."""
    return [f"{k['arch']} {k.get('name', k['mangled'])}: {k['REG']} registers"
            for k in kernels if k["REG"] > MAX_REGISTERS.get(k.get("family"), -1)]


def problems(kernels: List[Dict]) -> List[str]:
    """Every kernel that uses stack or local memory (spills, or arrays indexed at run
    time): one line each."""
    return [f"{k['arch']} {k.get('name', k['mangled'])}: STACK {k.get('STACK')} LOCAL {k.get('LOCAL')}"
            for k in kernels if k.get("STACK", 0) != 0 or k.get("LOCAL", 0) != 0]


def dump(so: str, cuobjdump: str) -> str:
    return subprocess.run([cuobjdump, "--dump-resource-usage", so], capture_output=True,
                          text=True, check=True).stdout


def tile_of(k: Dict, tiles: Dict) -> Dict:
    acc = "double" if k["acc"] == "double" else "float"
    if k["kind"] == "forward" and k["phase"] == "fused":
        return tiles[f"forward_fused[{acc}]"]
    if k["kind"] == "forward" and k["phase"] == "reset_update":
        return tiles[f"forward_reset[{acc}]"]
    return tiles["one_gate"]


def occupancy_sm90(regs: int, threads: int, smem: int) -> Dict:
    """Blocks per SM and the fraction of the SM's 64 warps they keep resident."""
    warps = threads // 32
    regs_per_warp = -(-regs * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    by_regs = SM90["regs"] // (regs_per_warp * warps)
    by_threads = SM90["threads"] // threads
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved"])
    blocks = min(by_regs, by_threads, by_smem, SM90["blocks"])
    limit = min((by_regs, "registers"), (by_threads, "threads"), (by_smem, "shared memory"))[1]
    return dict(blocks=blocks, occupancy=blocks * warps / 64, limit=limit)


TORCH_DTYPES = {"float": "float32", "double": "float64", "Half": "float16",
                "BFloat16": "bfloat16"}


def persistent_plan(k: Dict) -> Dict:
    """The planner's plan for a persistent kernel's direction, dtype, formula and family
    at PLAN_SHAPE on an H200 (the family forced, as GRU_FUSED_CUDA_KERNEL would)."""
    import torch

    import gru_fused
    H, B = PLAN_SHAPE
    return gru_fused.cuda_kernel_plan(H, B, getattr(torch, TORCH_DTYPES[k["dtype"]]),
                                      k["reset_after"], kernel=k["family"],
                                      device_properties=H200_PROPERTIES)[k["kind"]]


def table(kernels: List[Dict], tiles: Dict, arch: str = "sm_90") -> str:
    H, B = PLAN_SHAPE
    lines = ["| kernel | formula | dtype | registers | stack, local | block tile (units x rows) "
             "| dynamic shared memory | blocks/SM (limit) | occupancy |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {"float": 0, "double": 1, "Half": 2, "BFloat16": 3}
    keyed = sorted((k for k in kernels if k["arch"] == arch and "phase" in k),
                   key=lambda k: (k["phase"] == "persistent", k["kind"] != "forward",
                                  not k["reset_after"], k["phase_index"],
                                  order.get(k["dtype"], 9)))
    for k in keyed:
        if k["phase"] == "persistent":
            formula = "reset_after" if k["reset_after"] else "reset_before"
            head = (f"| {k['kind']} persistent {k['family']} | {formula} | {k['dtype']} "
                    f"| {k['REG']} | {k['STACK']}, {k['LOCAL']} | ")
            if k["family"] == "cluster" and int(re.sub(r"\D", "", arch) or 0) < 90:
                lines.append(head + "never launched: clusters need sm_90 (a __trap stub) "
                             "| - | - | - |")
                continue
            plan = persistent_plan(k)
            if plan["family"] != k["family"]:  # the planner would not run it at this shape
                lines.append(head + "per plan | per plan | - | - |")
                continue
            occ = occupancy_sm90(k["REG"], 256, plan["smem"])
            ctas = plan["cluster"] * plan["clusters"]
            lines.append(
                f"| {k['kind']} persistent {k['family']} | {formula} | {k['dtype']} | {k['REG']} "
                f"| {k['STACK']}, {k['LOCAL']} | per CTA {plan['units']} x {plan['rows']} "
                f"({ctas} CTAs; plan at H={H}, B={B}) | {plan['smem'] / 1024:.1f} KB "
                f"| {occ['blocks']} ({occ['limit']}) | {occ['occupancy']:.0%} |")
            continue
        tile = tile_of(k, tiles)
        units, rows = tile["units"], tile["rows"]
        smem = tile["smem_double"] if k["acc"] == "double" else tile["smem_float"]
        occ = occupancy_sm90(k["REG"], tile["threads"], smem)
        lines.append(
            f"| {k['kind']} {k['phase']} | {'reset_after' if k['reset_after'] else 'reset_before'} "
            f"| {k['dtype']} | {k['REG']} | {k['STACK']}, {k['LOCAL']} | {units} x {rows} "
            f"| {smem / 1024:.1f} KB | {occ['blocks']} ({occ['limit']}) | {occ['occupancy']:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90", help="the architecture whose table to print")
    p.add_argument("--so", default=None, help="the extension (default: gru_fused._C)")
    args = p.parse_args(argv)
    tool = find_cuobjdump()
    if tool is None:
        p.error("no cuobjdump found: pip install nvidia-cuda-cuobjdump, or a CUDA toolkit")
    import gru_fused._C as C
    if not getattr(C, "CUDA_COMPILED", False):
        p.error("gru_fused was built without CUDA kernels")
    kernels = gru_kernels(parse_resource_usage(dump(args.so or extension_path(), tool)))
    print(table(kernels, C.CUDA_TILES, args.arch))
    bad = problems(kernels)
    for line in bad:
        print("uses stack or local memory:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
