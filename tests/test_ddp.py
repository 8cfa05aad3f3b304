"""FusedGRU under torch.nn.parallel.DistributedDataParallel.

Two processes on this machine each take half of a global batch; after one backward
step DDP's all-reduced gradients must equal those of one process training on the whole
batch. Nothing here is distribution code of ours: FusedGRU is an ordinary nn.Module
whose parameters DDP broadcasts and whose gradients it all-reduces.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gru_fused import FusedGRU

WORLD_SIZE = 2
T, B, I, H = 5, 4, 3, 6  # B: the global batch, split evenly over the ranks
TOL = dict(rtol=1e-10, atol=1e-12)  # float64; all-reduce only reorders two terms


def _model(device):
    torch.manual_seed(0)
    return FusedGRU(I, H, num_layers=2, bidirectional=True, dropout=0.0,
                    dtype=torch.float64, device=device)


def _global_batch(device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=gen, dtype=torch.float64)
    hx = torch.randn(4, B, H, generator=gen, dtype=torch.float64)
    target = torch.randn(T, B, 2 * H, generator=gen, dtype=torch.float64)
    return x.to(device), hx.to(device), target.to(device)


def _loss(model, x, hx, target):
    # Means over equal-sized shards average to the mean over the global batch, which
    # is what DDP's gradient averaging assumes.
    out, h_n = model(x, hx)
    return ((out - target) ** 2).mean() + (h_n ** 2).mean()


def _worker(rank, backend, device_kind, init_file, result_dir):
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        device = torch.device(device_kind, rank) if device_kind == "cuda" else torch.device("cpu")
        model = _model(device)
        ddp = DDP(model, device_ids=[rank] if device_kind == "cuda" else None)
        x, hx, target = _global_batch(device)
        shard = slice(rank * B // WORLD_SIZE, (rank + 1) * B // WORLD_SIZE)
        _loss(ddp, x[:, shard], hx[:, shard], target[:, shard]).backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters()}
        torch.save(grads, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _check_ddp_matches_single_process(device_kind, backend, tmp_path):
    mp.spawn(_worker, args=(backend, device_kind, str(tmp_path / "init"), str(tmp_path)),
             nprocs=WORLD_SIZE, join=True)

    device = "cuda:0" if device_kind == "cuda" else "cpu"
    model = _model(device)
    _loss(model, *_global_batch(device)).backward()
    expected = {n: p.grad.cpu() for n, p in model.named_parameters()}
    for rank in range(WORLD_SIZE):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert grads.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], **TOL,
                                       msg=lambda m, n=name, r=rank: f"rank {r}, {n}: {m}")


def test_ddp_matches_single_process_cpu(tmp_path):
    _check_ddp_matches_single_process("cpu", "gloo", tmp_path)


def test_ddp_matches_single_process_cuda(cuda_device, tmp_path):
    if torch.cuda.device_count() < WORLD_SIZE:
        pytest.skip(f"needs {WORLD_SIZE} GPUs, {torch.cuda.device_count()} visible")
    _check_ddp_matches_single_process("cuda", "nccl", tmp_path)
