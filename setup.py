"""Builds gru_fused._C: the CPU kernels always, the CUDA kernels when they can be built.

Build knobs (environment variables):
  GRU_FUSED_FORCE_CPU=1      build the CPU kernels only, even when CUDA is available
  CUDA_HOME / CUDA_PATH      the CUDA toolkit; else /usr/local/cuda, else found from nvcc on PATH
  TORCH_CUDA_ARCH_LIST       e.g. "8.0;9.0"; default: the visible GPUs, or "8.0;9.0" if none
  MAX_JOBS                   parallel compile jobs (ninja)
  GRU_FUSED_DEBUG_INFO=1     keep debug information (-g) in the extension; default: none

Every run also writes gru_fused/_version.py (git-ignored): the version from pyproject.toml
and, in a git checkout, the commit (see write_version_file). An sdist carries the file.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION_FILE = os.path.join("gru_fused", "_version.py")


def project_version():
    """[project] version in pyproject.toml, the one place it is written."""
    with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as f:
        m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    if m is None:
        raise RuntimeError("pyproject.toml has no [project] version")
    return m.group(1)


def git_commit():
    """HEAD's short hash, with "-dirty" when tracked files differ from it (as `git describe
    --dirty`: untracked files do not count); None when this directory is not the top of a
    git checkout (an unpacked sdist, a tarball, no git installed)."""
    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=HERE,
                              capture_output=True, text=True, timeout=60)
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(HERE):
            return None  # not a checkout, or a directory inside some other repository
        head = git("rev-parse", "--short", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or status.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def version_file_text(commit):
    return ("# Written by setup.py (git-ignored in the checkout); do not edit.\n"
            f"__version__ = {project_version()!r}\n"
            f"__commit__ = {commit!r}\n")


def write_version_file(path=os.path.join(HERE, VERSION_FILE)):
    """gru_fused/_version.py with the version and the commit: from git in a checkout; else
    the file already there is kept (an sdist's, which records the commit it was made
    from); else the commit is "unknown". Rewritten only when its text changes."""
    commit = git_commit()
    if commit is None and os.path.exists(path):
        return
    text = version_file_text(commit or "unknown")
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


class SdistWithVersion(sdist):
    """sdist whose gru_fused/_version.py records the commit the sdist is made from."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        target = os.path.join(base_dir, VERSION_FILE)
        if os.path.exists(target):
            os.remove(target)  # may be a hard link to the checkout's file
        with open(target, "w", encoding="utf-8") as f:
            f.write(version_file_text(git_commit() or _existing_commit()))


def _existing_commit():
    try:
        with open(os.path.join(HERE, VERSION_FILE), encoding="utf-8") as f:
            m = re.search(r"^__commit__ = '([^']*)'", f.read(), re.MULTILINE)
        return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


write_version_file()


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


# The sources, each list longest compile first (so that with few jobs the long ones start
# early). The CUDA kernels are cuda/gru_cuda.cu (nvcc); cuda/gru_cuda_ops.cpp, their host side,
# includes CUDA headers too, so it is built with them only.
CPU_SOURCES = ["csrc/cpu/gru_cpu.cpp", "csrc/gru_driver.cpp", "csrc/ops.cpp"]
CUDA_SOURCES = ["csrc/cuda/gru_cuda.cu", "csrc/cuda/gru_cuda_ops.cpp"]


def extensions():
    with_cuda, reason = build_plan()
    known = set(CPU_SOURCES + CUDA_SOURCES)
    unknown = sorted(set(glob.glob("csrc/**/*.cpp", recursive=True) +
                         glob.glob("csrc/**/*.cu", recursive=True)) - known)
    if unknown:
        raise RuntimeError(f"setup.py: add {unknown} to CPU_SOURCES or CUDA_SOURCES")
    # The CPU gate passes are vectorized by the compiler (csrc/cpu/gru_cpu.cpp):
    # -ffp-contract=off: no fused multiply-adds behind the code's back, so the AVX-512,
    #   AVX2 and baseline builds of a gate pass, and a loop's vector body and its scalar
    #   remainder, compute the same bits (however a pass is split across threads).
    # -fno-trapping-math: lets a select like `small ? a : b` compute both sides in
    #   vector lanes; floating-point exceptions are never observed (torch builds so too).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-Wall", "-Wextra",
           "-Wno-unused-parameter"]
    link = ["-fopenmp"]
    # Python's own CFLAGS (sysconfig) hold -g: a release extension drops the debug
    # information (a third to a half of the compile time, most of the .so). -g0 comes after
    # them, so it wins; the linker strips whatever an object still carries.
    debug_info = os.environ.get("GRU_FUSED_DEBUG_INFO", "0") not in ("", "0")
    if not debug_info:
        cxx.append("-g0")
        link.append("-Wl,--strip-debug")
    # Includes name their path from csrc/ ("cuda/gru_kernels.cuh"), whatever folder the
    # including file is in: shared headers at the top, one folder per backend.
    include_dirs = [os.path.join(HERE, "csrc")]
    if not with_cuda:
        print(f"gru_fused: building CPU kernels only ({reason})", flush=True)
        return [CppExtension("gru_fused._C", CPU_SOURCES, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=link)]
    archs, why = default_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"gru_fused: building CPU + CUDA kernels for sm {archs} ({why}; {reason})",
          flush=True)
    # -lineinfo: the device code's line table (no host debug information, no effect on
    # the generated code), so that compute-sanitizer (benchmarks/gpu_check.sh) and Nsight
    # name the source line of a fault or a hot spot.
    nvcc = ["-O3", "-lineinfo",
            # Warnings in the project's CUDA sources fail the build.
            "-Werror", "all-warnings", "-Xcompiler", "-Wall"]
    if not debug_info:
        nvcc += ["-Xcompiler", "-g0"]
    # Longest first: the kernels, the CPU loops, then the rest.
    sources = CUDA_SOURCES[:1] + CPU_SOURCES[:1] + CUDA_SOURCES[1:] + CPU_SOURCES[1:]
    return [CUDAExtension("gru_fused._C", sources, include_dirs=include_dirs,
                          define_macros=[("GRU_FUSED_WITH_CUDA", None)],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                          extra_link_args=link)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension, "sdist": SdistWithVersion},
)
