"""The CUDA backend's kernel choice (csrc/cuda/gru_persistent_plan.h), reported by
gru_fused.cuda_kernel_plan for devices described by their properties: no GPU needed.
The emulation tests (test_emulation.py) run the plans; these check the decisions. Most
plan with kernel="persistent" (the persistent kernels' geometry); auto runs the step
kernels for now (test_auto_runs_the_step_kernels)."""
import pytest
import torch

import gru_fused

# From the vendors' specifications (cudaDeviceGetAttribute's values on those GPUs).
H200 = {"cc": (9, 0), "sm_count": 132, "smem_per_block_optin": 232448, "cooperative": True,
        "clusters": True}
A100 = {"cc": (8, 0), "sm_count": 108, "smem_per_block_optin": 166912, "cooperative": True,
        "clusters": False}
T4 = {"cc": (7, 5), "sm_count": 40, "smem_per_block_optin": 65536, "cooperative": True,
      "clusters": False}


def plan(H, B, dtype=torch.float32, device=H200, kernel="persistent", **kw):
    return gru_fused.cuda_kernel_plan(H, B, dtype, device_properties=device, kernel=kernel, **kw)


def test_auto_runs_the_step_kernels():
    """auto (the default): the step kernels on every device, dtype and shape, with the
    reason, until a GPU measures where the persistent kernels win (PERF_MODEL.md
    estimates them slower as built)."""
    for device in (H200, A100, T4):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for H, B in ((256, 32), (1024, 64), (64, 1)):
                for p in (plan(H, B, dtype, device, kernel="auto"),
                          gru_fused.cuda_kernel_plan(H, B, dtype, device_properties=device)):
                    for direction, d in p.items():
                        assert d["family"] == "step" and d["smem"] == 0, (direction, d)
                        assert d["why"].startswith("auto: the step kernels"), d


def test_book_shape_on_h200_runs_clusters():
    """H=256, B=32, float32: clusters of 16 CTAs (non-portable, sm_90) of 16 units; the
    forward's W_hh slice is 3 x 16 x 256 floats (48 KB) per CTA; 4 clusters of 8 rows
    (the forward's tile rows), 8 of 4 backward."""
    p = plan(256, 32)
    f, b = p["forward"], p["backward"]
    assert (f["family"], f["cluster"], f["units"], f["rows"], f["clusters"]) == \
        ("cluster", 16, 16, 8, 4)
    assert (b["family"], b["cluster"], b["units"], b["rows"], b["clusters"]) == \
        ("cluster", 16, 16, 4, 8)
    # W slice + two state buffers [8, 256] + the fused tile's scratch (8 warps x 24 x 33).
    assert f["smem"] == 3 * 16 * 256 * 4 + 2 * 8 * 256 * 4 + 8 * 24 * 33 * 4
    assert f["smem"] <= H200["smem_per_block_optin"] and b["smem"] <= H200["smem_per_block_optin"]
    assert "cluster of 16 CTAs" in f["why"]


def test_portable_clusters_where_16_is_not_allowed():
    """max_cluster=8 (a device without non-portable clusters, or the re-plan after a GPU
    refused 16): the portable 8 CTAs of 32 units; compute capabilities other than 9.0
    and 10.0 default to 8; bfloat16 with max_cluster=4, 5 or 7: clusters of 4 (float32's
    64-unit slices, 196 KB of W_hh, would not fit with the rest); 0: no clusters."""
    for props in (dict(H200, max_cluster=8), dict(H200, cc=(12, 0)), dict(H200, cc=(10, 1))):
        f = plan(256, 32, device=props)["forward"]
        assert (f["family"], f["cluster"], f["units"], f["rows"], f["clusters"]) == \
            ("cluster", 8, 32, 8, 4), (props, f)
    for widest in (4, 5, 7):
        f = plan(256, 32, torch.bfloat16, device=dict(H200, max_cluster=widest))["forward"]
        assert (f["family"], f["cluster"], f["units"]) == ("cluster", 4, 64), (widest, f)
    assert plan(256, 32, device=dict(H200, max_cluster=0))["forward"]["family"] == "cooperative"


@pytest.mark.parametrize("B", [1, 8, 32, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_clusters_cover_the_batch_and_fit(B, dtype):
    """Every batch row in one cluster, every unit in one CTA (none empty), no more CTAs
    than SMs, within the shared memory a CTA may opt in to."""
    for direction, p in plan(256, B, dtype).items():
        assert p["family"] == "cluster", p
        assert p["rows"] * p["clusters"] >= B > p["rows"] * (p["clusters"] - 1)
        assert p["units"] * p["cluster"] >= 256 > p["units"] * (p["cluster"] - 1)
        assert p["cluster"] * p["clusters"] <= H200["sm_count"]
        assert p["smem"] <= H200["smem_per_block_optin"]


def test_a_narrower_cluster_that_fits_is_taken():
    """bfloat16 backward, H=256, B=1024, portable clusters: 8-CTA clusters (16 of them,
    64 rows each) need 48 KB of W_hh^T and 2 x 96 KB of exchange buffers per CTA, over the
    227 KB; 4-CTA clusters (33, 32 rows each) hold twice the W_hh^T but half the buffers,
    and fit."""
    b = plan(1024 // 4, 1024, torch.bfloat16, device=dict(H200, max_cluster=8))["backward"]
    assert (b["family"], b["cluster"], b["rows"]) == ("cluster", 4, 32), b
    assert b["smem"] <= H200["smem_per_block_optin"]


def test_huge_batch_leaves_clusters_for_the_cooperative_grid():
    """B=4096 float32: a cluster's exchange buffers for 256 rows would not fit; the
    cooperative kernels keep no rows in shared memory."""
    for direction, p in plan(256, 4096).items():
        assert p["family"] == "cooperative" and p["rows"] == 4096, p


def test_large_h_on_h200_is_cooperative_and_a100_has_no_clusters():
    """H=1024 float32: W_hh is 12 MB, more than a cluster's 8 x 227 KB: a cooperative grid
    of one CTA per SM at most. An A100 has no clusters: cooperative from H=256 on."""
    for direction, p in plan(1024, 32).items():
        assert p["family"] == "cooperative" and p["cluster"] <= 132, p
        assert p["units"] * p["cluster"] >= 1024 and p["rows"] == 32
        assert "exceed" in p["why"]
    for direction, p in plan(256, 32, device=A100).items():
        assert p["family"] == "cooperative" and "no thread-block clusters" in p["why"], p
        assert p["smem"] <= A100["smem_per_block_optin"]
    # H=1024 backward on an A100: 16-unit slices would not fit, one CTA per SM does.
    b = plan(1024, 32, device=A100)["backward"]
    assert b["family"] == "cooperative" and b["cluster"] == 103 and b["units"] == 10


def test_step_kernels_where_nothing_else_runs():
    for direction, p in plan(256, 32, torch.float64).items():
        assert p["family"] == "step" and "float64" in p["why"]
    for direction, p in plan(4096, 32, device=T4).items():  # 96 MB of W_hh over 40 SMs
        assert p["family"] == "step" and "exceed" in p["why"], p
    for direction, p in plan(256, 32, kernel="step").items():
        assert p["family"] == "step" and p["smem"] == 0


def test_override_and_environment(monkeypatch):
    assert plan(256, 32, kernel="cooperative")["forward"]["family"] == "cooperative"
    assert plan(256, 32, kernel="cluster", device=A100)["forward"]["family"] == "step"
    assert plan(256, 32, kernel="persistent", device=A100)["forward"]["family"] == "cooperative"
    monkeypatch.setenv("GRU_FUSED_CUDA_KERNEL", "cluster")
    assert plan(256, 32, kernel=None)["forward"]["family"] == "cluster"  # the variable
    assert plan(256, 32, kernel="step")["forward"]["family"] == "step"  # argument wins
    monkeypatch.setenv("GRU_FUSED_CUDA_KERNEL", "fastest")
    with pytest.raises(ValueError, match="GRU_FUSED_CUDA_KERNEL=fastest: expected auto"):
        plan(256, 32, kernel=None)


@pytest.mark.parametrize("kwargs,match", [
    ({"hidden_size": 0}, "hidden_size must be a positive int"),
    ({"batch_size": 2.0}, "batch_size must be a positive int"),
    ({"dtype": torch.int32}, "dtype must be a floating-point"),
    ({"kernel": "fast"}, "kernel must be one of"),
])
def test_bad_arguments(kwargs, match):
    args = {"hidden_size": 256, "batch_size": 32, "device_properties": H200, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        gru_fused.cuda_kernel_plan(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_no_device_needs_properties():
    with pytest.raises(RuntimeError, match="no CUDA device here; pass device_properties"):
        gru_fused.cuda_kernel_plan(256, 32)
