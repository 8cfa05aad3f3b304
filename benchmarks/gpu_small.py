"""A small CUDA run of every kernel variant, for compute-sanitizer (benchmarks/gpu_check.sh).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/gpu_small.py
    compute-sanitizer --tool racecheck --kernel-name kns=gru_fused python benchmarks/gpu_small.py

Every dtype x formula x direction, without and with padded lengths (unsorted, one empty
sequence): forward + backward (the [4, T, B, H] workspace), and the inference op (one
step's [4, 1, B, H] workspace, which every step rewrites). Then a packed FusedGRU, two
layers both ways. Odd sizes exercise the bounds checks: H=37 partial unit tiles, B=9
partial batch tiles; H=300 several chunks of k, the last partial, in every kernel (the
double-buffered loop: the next chunk stored while other warps read the current one).
"""
import sys
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gru_fused  # noqa: E402

assert torch.cuda.is_available() and gru_fused.cuda_compiled(), "needs a GPU and a CUDA build"
torch.manual_seed(0)
T, B, I = 3, 9, 5
dev = "cuda"
runs = 0
for H in (37, 300):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for reset_after in (True, False):
            for reverse in (False, True):
                for lengths in (None, torch.tensor([3, 1, 0, 2, 3, 3, 1, 2, 3])):
                    def tensor(*shape):
                        t = torch.randn(*shape, device=dev) * 0.5
                        return t.to(dtype).requires_grad_()

                    x, hx = tensor(T, B, I), tensor(B, H)
                    params = [tensor(3 * H, I), tensor(3 * H, H), tensor(3 * H), tensor(3 * H)]
                    out, h_n = gru_fused.gru(x, hx, *params, reset_after=reset_after,
                                             reverse=reverse, lengths=lengths)
                    (out.float().sum() + h_n.float().sum()).backward()
                    with torch.no_grad():  # gru_inference
                        gru_fused.gru(x, hx, *params, reset_after=reset_after, reverse=reverse,
                                      lengths=lengths)
                    runs += 1

H = 37
model = gru_fused.FusedGRU(I, H, num_layers=2, bidirectional=True, device=dev)
packed = pack_padded_sequence(torch.randn(T, B, I, device=dev),
                              torch.tensor([3, 1, 2, 2, 3, 3, 1, 2, 3]), enforce_sorted=False)
out, h_n = model(packed)
(out.data.sum() + h_n.sum()).backward()
torch.cuda.synchronize()
print(f"gpu_small: {runs} op variants (forward, backward, inference) and a packed FusedGRU ran")
