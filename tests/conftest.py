"""Shared test fixtures.

Nothing here touches the GPU at import time: a test module must be collectable on a
CPU-only machine. CUDA tests take the ``cuda_device`` fixture and are skipped, with the
reason, when there is no GPU or the extension was built without CUDA kernels.
"""
import os
from pathlib import Path

import pytest
import torch

# Where CI and the developers keep the book's text: shared/ beside the checkout. Never
# committed; $GRU_FUSED_DATA overrides.
SHARED_TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "timemachine.txt"


@pytest.fixture(scope="session")
def text_path() -> Path:
    """The verified-by-the-tests copy of timemachine.txt; skips without it, except in CI."""
    path = Path(os.environ.get("GRU_FUSED_DATA") or SHARED_TEXT)
    if not path.is_file():
        reason = f"timemachine.txt not found at {path}; set GRU_FUSED_DATA"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path.resolve()


@pytest.fixture
def cuda_device() -> str:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    import gru_fused

    if not gru_fused.cuda_compiled():
        pytest.skip("gru_fused was built without its CUDA kernels")
    return "cuda"
