"""Shared test fixtures.

Nothing here touches the GPU at import time: a test module must be collectable on a
CPU-only machine. CUDA tests take the ``cuda_device`` fixture and are skipped, with the
reason, when there is no GPU or the extension was built without CUDA kernels.
"""
import pytest
import torch


@pytest.fixture
def cuda_device() -> str:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    import gru_fused

    if not gru_fused.cuda_compiled():
        pytest.skip("gru_fused was built without its CUDA kernels")
    return "cuda"
