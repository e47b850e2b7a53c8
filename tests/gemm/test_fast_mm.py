"""mm_float_out / the brgemm_mm kernel: against float64 products over shapes (column-block and row-chunk edges),
dtypes and strided operands; the fallback; the C++ boundary checks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itm_kernels._common.fast_mm import brgemm_available, mm_float_out

pytestmark = pytest.mark.skipif(not brgemm_available(torch.float32), reason="needs the compiled extension")


@settings(max_examples=25, deadline=None)
@given(M=st.sampled_from([1, 3, 255, 257, 600]), K=st.sampled_from([2, 16, 256, 258, 1024]),
       N=st.sampled_from([1, 63, 64, 65, 256]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       row_pad=st.sampled_from([0, 5]), seed=st.integers(0, 1000))
def test_matches_float64_product(M, K, N, dtype, row_pad, seed):
    """float32: within 4x torch.mm's own error + 1e-6 (relative to sqrt(K) |a| |b|); bfloat16: the float64
    product of the bfloat16-rounded operands within float32 accumulation error (1e-5 of the same scale)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(M, K + row_pad, generator=g)
    a, b = base[:, :K].to(dtype), torch.randn(K, N, generator=g).to(dtype)
    got = mm_float_out(a, b)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    exact = a.double() @ b.double()
    scale = K ** 0.5
    if dtype == torch.float32:
        own = (torch.mm(a, b).double() - exact).abs().max().item()
        assert (got.double() - exact).abs().max().item() <= 4 * own + 1e-6 * scale
    else:
        assert (got.double() - exact).abs().max().item() <= 1e-5 * scale


def test_uses_brgemm_on_cpu(monkeypatch):
    calls = []
    real = torch.ops.itm_kernels.brgemm_mm
    monkeypatch.setattr(torch.ops.itm_kernels, "brgemm_mm", lambda *a: (calls.append(1), real(*a))[1],
                        raising=False)
    mm_float_out(torch.randn(4, 8), torch.randn(8, 3))
    assert calls


def test_fallbacks(monkeypatch):
    """float64, odd-K bfloat16 and a non-unit column stride take torch.mm (float32 result), never brgemm."""
    monkeypatch.setattr(torch.ops.itm_kernels, "brgemm_mm", lambda *a: pytest.fail("brgemm_mm called"),
                        raising=False)
    cases = [(torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)),
             (torch.randn(5, 7).bfloat16(), torch.randn(7, 3).bfloat16()),
             (torch.randn(7, 5).t(), torch.randn(7, 3))]
    for a, b in cases:
        got = mm_float_out(a, b)
        assert got.dtype == torch.float32 and torch.equal(got, torch.mm(a, b).float())


def test_kernel_rejects_bad_operands():
    op = torch.ops.itm_kernels.brgemm_mm
    for args, message in [((torch.randn(3, 4).double(), torch.randn(4, 2).double()), "float32 or bfloat16"),
                          ((torch.randn(3, 4), torch.randn(4, 2).bfloat16()), "dtype"),
                          ((torch.randn(3, 4), torch.randn(5, 2)), r"contiguous \(4, N\)"),
                          ((torch.randn(4, 3).t(), torch.randn(4, 2)), "unit column stride"),
                          ((torch.randn(0, 4), torch.randn(4, 2)), "empty"),
                          ((torch.randn(3, 4), torch.randn(4, 6)[:, ::2]), "contiguous")]:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
