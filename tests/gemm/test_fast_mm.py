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
    """float64 and a non-unit column stride take torch.mm (float32 result), never brgemm."""
    monkeypatch.setattr(torch.ops.itm_kernels, "brgemm_mm", lambda *a: pytest.fail("brgemm_mm called"),
                        raising=False)
    cases = [(torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)),
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


def test_odd_k_bfloat16_is_widened_not_rounded():
    """Odd-K bfloat16 (no VNNI pairs) runs brgemm_mm, widened to float32 in C++: the float64 product of the
    bfloat16 operands within float32 accumulation error (1e-6 at K = 7), never a bfloat16-rounded result."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g).bfloat16(), torch.randn(7, 3, generator=g).bfloat16()
    got = mm_float_out(a, b)
    assert got.dtype == torch.float32
    assert (got.double() - a.double() @ b.double()).abs().max().item() <= 1e-6


_AVX2_SCRIPT = """
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import itm_kernels
from itm_kernels._common.fast_mm import mm_float_out
info = itm_kernels.build_info()
assert info["bf16_gemm"] == "gemm-fp32-accumulate", info["bf16_gemm"]
mms = []
class Count(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm) and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in args):
            mms.append(str(func))
        return func(*args, **(kwargs or {}))
a = torch.tensor([[1.0, 2.0 ** -9]]).bfloat16()
b = torch.tensor([[1.0], [1.0]]).bfloat16()
with Count():
    got = mm_float_out(a, b)
    big = mm_float_out(torch.randn(300, 66).bfloat16(), torch.randn(66, 70).bfloat16())
assert got.dtype == torch.float32 and got.item() == 1.0 + 2.0 ** -9, got.item()
assert not mms, mms
print("ok")
"""


def test_bfloat16_without_native_dot_product_accumulates_in_float32():
    """ONEDNN_MAX_CPU_ISA=AVX2 (as on an AVX2-only CPU): bf16_gemm falls to gemm-fp32-accumulate and bfloat16
    mm_float_out still returns the float32-accumulated product (the issue's M=1, K=2, N=1 case: 1 + 2^-9 is exact
    in float32 and rounds to 1 in bfloat16) through brgemm_mm, with no bfloat16 aten mm/addmm/bmm."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    run = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr
