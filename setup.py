"""Builds gru_fused._C: the CPU kernels always, the CUDA kernels when they can be built.

Build knobs (environment variables):
  GRU_FUSED_FORCE_CPU=1      build the CPU kernels only, even when CUDA is available
  CUDA_HOME / CUDA_PATH      the CUDA toolkit; else /usr/local/cuda, else found from nvcc on PATH
  TORCH_CUDA_ARCH_LIST       e.g. "8.0;9.0"; default: the visible GPUs, or "8.0;9.0" if none
  MAX_JOBS                   parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The toolkit root: CUDA_HOME/CUDA_PATH, /usr/local/cuda, or nvcc's own location.

    nvcc on PATH may be a symlink or a wrapper script (`exec /opt/cuda-13/bin/nvcc "$@"`),
    so follow both to the real binary before taking its grandparent.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            m = re.search(rb"(/[^\s\"']+)/bin/nvcc\b", head)
            if m:
                nvcc = os.path.realpath(m.group(1).decode() + "/bin/nvcc")
    except OSError:
        pass
    home = os.path.dirname(os.path.dirname(nvcc))
    return home if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) else None


# torch.utils.cpp_extension reads CUDA_HOME when imported: settle it first.
CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def build_plan():
    """(with_cuda, reason) for the one line that says what is built."""
    if os.environ.get("GRU_FUSED_FORCE_CPU", "0") not in ("", "0"):
        return False, "GRU_FUSED_FORCE_CPU is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def default_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"], "from TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                       for i in range(torch.cuda.device_count())})
        return ";".join(caps), "the visible GPUs"
    return "8.0;9.0", "default, no GPU visible"


def extensions():
    with_cuda, reason = build_plan()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # The CPU gate passes are vectorized by the compiler (csrc/gru_cpu.cpp):
    # -ffp-contract=off: no fused multiply-adds behind the code's back, so the AVX-512,
    #   AVX2 and baseline builds of a gate pass, and a loop's vector body and its scalar
    #   remainder, compute the same bits (however a pass is split across threads).
    # -fno-trapping-math: lets a select like `small ? a : b` compute both sides in
    #   vector lanes; floating-point exceptions are never observed (torch builds so too).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-Wall", "-Wextra",
           "-Wno-unused-parameter"]
    if not with_cuda:
        print(f"gru_fused: building CPU kernels only ({reason})", flush=True)
        return [CppExtension("gru_fused._C", sources, extra_compile_args={"cxx": cxx},
                             extra_link_args=["-fopenmp"])]
    archs, why = default_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"gru_fused: building CPU + CUDA kernels for sm {archs} ({why}; {reason})",
          flush=True)
    sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc = ["-O3", "-lineinfo",
            # Warnings in the project's CUDA sources fail the build.
            "-Werror", "all-warnings", "-Xcompiler", "-Wall"]
    return [CUDAExtension("gru_fused._C", sources,
                          define_macros=[("GRU_FUSED_WITH_CUDA", None)],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                          extra_link_args=["-fopenmp"])]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
