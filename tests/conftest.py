"""Shared test helpers: hypothesis profile, golden loading, self-explaining comparisons."""
from __future__ import annotations

import os
from pathlib import Path

# Triton fixes interpreter-or-compiler at its first import: without a GPU, test its kernels in the interpreter.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("ITM_GOLDEN_DIR", REPO.parent / "shared" / "reference" / "golden"))


def golden_path(name: str) -> Path:
    """Path of one official golden file; a missing file FAILS the test (golden checks never skip silently)."""
    path = GOLDEN_DIR / name
    if not path.exists():
        pytest.fail(f"golden file {path} is missing: the official-output checks need ../shared/reference/golden "
                    f"beside the repository, or ITM_GOLDEN_DIR=/path/to/golden pointing at a copy of it",
                    pytrace=False)
    return path


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = ""):
    """assert |actual - expected| <= atol + rtol |expected|, reporting count, first indices, values, max/mean diff."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bad = ~(diff <= atol + rtol * expected.abs())
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        vals = [(tuple(i), actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} mismatches (atol={atol}, rtol={rtol}); first (index, actual, "
            f"expected): {vals}; max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}")


def cpu_backends() -> list[str]:
    import itm_kernels

    return [b for b in itm_kernels.available_backends("cpu") if b not in ("triton",)]


@pytest.fixture(scope="session")
def scan_golden():
    return np.load(golden_path("scan_xattn.npz"))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one intra-op thread is as fast, and immune to OpenMP spin-waits on a busy
    machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
