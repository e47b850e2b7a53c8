"""The benchmarks' memory method (benchmarks/common.py: a fresh process per measurement, VmHWM reset) must see a
peak that was freed again inside the call, count the call's output, and report ~0 for a call that allocates
nothing."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

MIB = 2**20
pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def _alloc_and_free(nbytes: int):
    import torch

    def call():
        t = torch.ones(nbytes // 4, dtype=torch.float32)      # touched: resident
        del t
        return None
    return call


def _alloc_and_return(nbytes: int):
    import torch
    return lambda: torch.ones(nbytes // 4, dtype=torch.float32)


def _nothing():
    return lambda: None


def _reuse_warm(nbytes: int):
    """Inputs include a big freed buffer that an in-process method would reuse: the fresh process must not."""
    import torch
    scratch = torch.ones(nbytes // 4)
    del scratch                                              # freed before the call; trimmed by the method

    def call():
        t = torch.ones(nbytes // 4)
        del t
    return call


def test_freed_peak_is_counted():
    peak = common.peak_memory_subprocess(_alloc_and_free, 100 * MIB, threads=1)
    assert 95 * MIB <= peak <= 110 * MIB, peak / MIB


def test_output_is_counted_and_idle_call_is_zero():
    kept = common.peak_memory_subprocess(_alloc_and_return, 40 * MIB, threads=1)
    idle = common.peak_memory_subprocess(_nothing, threads=1)
    assert 38 * MIB <= kept <= 46 * MIB, kept / MIB
    assert idle <= 2 * MIB, idle / MIB


def test_earlier_free_does_not_hide_peak():
    peak = common.peak_memory_subprocess(_reuse_warm, 60 * MIB, threads=1)
    assert 57 * MIB <= peak <= 66 * MIB, peak / MIB


@pytest.mark.slow
def test_child_error_is_reported():
    with pytest.raises(RuntimeError, match="_alloc_and_free"):
        common.peak_memory_subprocess(_alloc_and_free, "not a size", threads=1)


def test_timing_spread():
    t = common.timings(lambda: None, repeats=3, warmup=0)
    assert len(t.times) == 3 and t.min <= t.median <= t.max
    assert common.Timing((1.0, 2.0, 4.0)).cell() == "2 (1-4)"
    with pytest.raises(ValueError, match="repeats"):
        common.timings(lambda: None, repeats=0)
