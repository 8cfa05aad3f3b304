"""Shared test fixtures.

Nothing here touches the GPU at import time: a test module must be collectable on a
CPU-only machine. CUDA tests take the ``cuda_device`` fixture and are skipped, with the
reason, when there is no GPU or the extension was built without CUDA kernels.

CUDA tests that compare float32 results with cuDNN (nn.GRU) take ``strict_fp32``:
PyTorch lets cuDNN's RNNs use TF32 by default (``torch.backends.cudnn.rnn.fp32_precision``
is ``'tf32'``), an error of about 1e-3 against our strict float32.
"""
import contextlib
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


@contextlib.contextmanager
def _fp32_precision(cudnn_rnn: str, matmul: str):
    """cuDNN's RNNs and cuBLAS's matmuls at the given float32 precision, 'ieee' or 'tf32',
    for the duration; restored after. Yields how it was set, for messages.

    The per-operation API (torch.backends.cudnn.rnn.fp32_precision and
    torch.backends.cuda.matmul.fp32_precision, torch >= 2.9) where torch has it, else the
    legacy flags (torch.backends.cudnn.allow_tf32, which covers cuDNN convolutions too, and
    torch.backends.cuda.matmul.allow_tf32). Our kernels compute in float32 either way; the
    GEMMs around them go through cuBLAS, hence the matmul setting.
    """
    assert cudnn_rnn in ("ieee", "tf32") and matmul in ("ieee", "tf32")
    cudnn, cuda_matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(cudnn, "rnn") and hasattr(cuda_matmul, "fp32_precision"):
        saved = (cudnn.rnn.fp32_precision, cuda_matmul.fp32_precision)
        how = (f"torch.backends.cudnn.rnn.fp32_precision = {cudnn_rnn!r} (was {saved[0]!r}), "
               f"torch.backends.cuda.matmul.fp32_precision = {matmul!r} (was {saved[1]!r})")
        try:
            cudnn.rnn.fp32_precision = cudnn_rnn
            cuda_matmul.fp32_precision = matmul
            assert (cudnn.rnn.fp32_precision, cuda_matmul.fp32_precision) == (cudnn_rnn, matmul)
            yield how
        finally:
            cudnn.rnn.fp32_precision, cuda_matmul.fp32_precision = saved
    else:
        saved = (cudnn.allow_tf32, cuda_matmul.allow_tf32)
        wanted = (cudnn_rnn == "tf32", matmul == "tf32")
        how = (f"torch.backends.cudnn.allow_tf32 = {wanted[0]} (was {saved[0]}), "
               f"torch.backends.cuda.matmul.allow_tf32 = {wanted[1]} (was {saved[1]}); this "
               "torch has no per-operation fp32_precision")
        try:
            cudnn.allow_tf32, cuda_matmul.allow_tf32 = wanted
            yield how
        finally:
            cudnn.allow_tf32, cuda_matmul.allow_tf32 = saved


@pytest.fixture
def strict_fp32():
    """cuDNN and cuBLAS in IEEE float32 (no TF32) for the test; yields how that was set
    (printed, so a failing test's captured output says it)."""
    with _fp32_precision("ieee", "ieee") as how:
        print(f"strict float32: {how}")
        yield how


@pytest.fixture
def fp32_precision():
    """The context manager behind strict_fp32, for a test that needs both precisions:
    ``with fp32_precision(cudnn_rnn="tf32", matmul="ieee") as how: ...``."""
    return _fp32_precision
