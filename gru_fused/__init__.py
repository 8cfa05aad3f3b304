"""gru_fused: fused GRU kernels for PyTorch (CPU and CUDA), a drop-in for torch.nn.GRU.

    gru_fused.gru(...)            differentiable functional op, one layer, one direction
    gru_fused.FusedGRU            drop-in replacement for torch.nn.GRU
    gru_fused.scratch             drop-in for the d2l from-scratch GRU functions
    gru_fused.reference           pure-PyTorch references of both formulas
    gru_fused.GRUFunction         the autograd.Function behind gru() (backward and jvp)
    gru_fused.cuda_compiled()     whether the CUDA kernels were compiled into the extension
    gru_fused.cuda_kernel_plan()  which CUDA kernels (step or persistent) a call would run
    gru_fused.empty_cache()       releases the CPU buffers the ops keep between calls
"""
from . import ops, reference
from .ops import GRUFunction, cached_bytes, cuda_compiled, cuda_kernel_plan, empty_cache, gru
from .module import FusedGRU
from . import scratch

__all__ = ["gru", "GRUFunction", "cuda_compiled", "cuda_kernel_plan", "cached_bytes",
           "empty_cache", "FusedGRU",
           "ops", "reference", "scratch"]
try:  # written by setup.py at build time: pyproject's version and the git commit built
    from ._version import __commit__, __version__
except ImportError:  # a tree built before setup.py wrote it
    __version__, __commit__ = "0.1.0", "unknown"
