"""A small CUDA forward + backward of every kernel variant, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/gpu_small.py
    compute-sanitizer --tool racecheck python benchmarks/gpu_small.py

Odd sizes (H=37: partial tiles; B=9: two batch tiles) so the bounds checks are exercised.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gru_fused  # noqa: E402

assert torch.cuda.is_available() and gru_fused.cuda_compiled(), "needs a GPU and a CUDA build"
torch.manual_seed(0)
T, B, I, H = 3, 9, 5, 37
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for reset_after in (True, False):
        for reverse in (False, True):
            for lengths in (None, torch.tensor([3, 1, 0, 2, 3, 3, 1, 2, 3])):
                x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
                hx = torch.randn(B, H, device="cuda", dtype=dtype, requires_grad=True)
                w_ih = torch.randn(3 * H, I, device="cuda", dtype=dtype, requires_grad=True)
                w_hh = torch.randn(3 * H, H, device="cuda", dtype=dtype, requires_grad=True)
                b_ih = torch.randn(3 * H, device="cuda", dtype=dtype, requires_grad=True)
                b_hh = torch.randn(3 * H, device="cuda", dtype=dtype, requires_grad=True)
                out, h_n = gru_fused.gru(x, hx, w_ih, w_hh, b_ih, b_hh, reset_after=reset_after,
                                         reverse=reverse, lengths=lengths)
                (out.float().sum() + h_n.float().sum()).backward()
torch.cuda.synchronize()
print("gpu_small: all variants ran")
