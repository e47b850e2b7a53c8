"""local_sim's C++ CPU backend (``itm_kernels::local_sim_cpu_`` through :func:`local_sim_cpu` / backend "cpu"):
against the float64 reference over drawn shapes (several caption blocks, image groups, feature chunks and GEMM
column blocks), ragged lengths, dtypes, scratch budgets and output dtypes/strides; SGRAF's realistic sizes;
padding never read; threads; opcheck and gradcheck through the backend; boundary errors of the Python function and
of the C++ op."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itm_kernels.local_sim import (_have_cpu_kernel, local_sim, local_sim_cpu, local_sim_gram, local_sim_op,
                                   local_sim_reference)
from conftest import REPO, assert_close_report
from test_local_sim import max_err, problem

pytestmark = pytest.mark.skipif(not _have_cpu_kernel(), reason="compiled extension (itm_kernels._C) not built")

CDTYPE = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32}


def assert_matches_reference(out, images, captions, lens, weight, bias, lam=9.0, what=""):
    """The house rule of test_local_sim.test_matches_reference: float64 1e-12; float32 / bfloat16 twice PyTorch's
    own error in that dtype plus 2e-6 / 2e-3, against the float64 reference on the same rounded inputs."""
    dtype = images.dtype
    exact = local_sim_reference(images.double(), captions.double(), lens, weight.double(), bias.double(),
                                lambda_softmax=lam)
    if dtype == torch.float64:
        assert_close_report(out, exact, atol=1e-12, rtol=0, what=f"{what} float64")
        return
    own = local_sim_reference(images, captions, lens, weight.to(dtype), bias.to(dtype), lambda_softmax=lam,
                              compute_dtype=dtype)
    allowed = 2 * max_err(own, exact) + (2e-6 if dtype == torch.float32 else 2e-3)
    assert_close_report(out, exact, atol=allowed, rtol=0,
                        what=f"{what} {dtype} (PyTorch's own error {max_err(own, exact):.2e})")


@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), n_img=st.integers(1, 6), n_cap=st.integers(1, 12),
       K=st.sampled_from([1, 2, 5, 36]), L=st.integers(1, 12), d=st.sampled_from([2, 3, 17, 64, 130]),
       s=st.sampled_from([1, 4, 37]), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       tile=st.sampled_from([0, 1, 6000, 40_000, 1 << 20]), lam=st.sampled_from([9.0, 4.0, 0.0]))
def test_matches_reference(seed, n_img, n_cap, K, L, d, s, dtype, tile, lam):
    """Up to 144 words (three packed column blocks of the score GEMM), d = 130 (three feature chunks at the smallest
    budget, an odd-width last block), odd d and K (the bfloat16 VNNI padding), s = 1. (Not d = 1: unit regions are
    then +-1 and the attended vector can cancel to exactly 0, where the Gram form |a|^2 = alpha^T G alpha of both
    "torch" and "cpu" leaves rounding noise: 6e-11 in float64.)"""
    images, captions, lens, weight, bias = problem(seed, n_img, n_cap, K, L, d, s, dtype)
    out = local_sim_cpu(images, captions, lens, weight, bias, lambda_softmax=lam, max_tile_bytes=tile or None)
    assert out.dtype == CDTYPE[dtype] and out.shape == (n_img, n_cap, L, s)
    pad = torch.arange(L)[None, :] >= lens[:, None]
    assert (out[:, pad] == 0).all()
    assert_matches_reference(out, images, captions, lens, weight, bias, lam)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sgraf_sizes(dtype):
    """SGRAF's K = 36, d = 1024, s = 256, lengths 8..20, over several caption blocks and image groups, and the same
    result through the registered op ("auto" picks "cpu") and with the projection weight in float32."""
    images, captions, lens, weight, bias = problem(21, n_img=5, n_cap=14, K=36, L=20, d=1024, s=256, dtype=dtype)
    lens = torch.randint(8, 21, (14,), generator=torch.Generator().manual_seed(0))
    out = local_sim_cpu(images, captions, lens, weight.float(), bias.float(), lambda_softmax=9.0)
    assert_matches_reference(out, images, captions, lens, weight, bias, what="K=36 d=1024 s=256")
    assert torch.equal(local_sim(images, captions, lens, weight, bias), out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_into_strided_out_views(dtype):
    """Rows written into word-node views x[:, :, 1:L+1] of larger node tensors of every output dtype equal the
    kernel's own rows cast once (float16: through a buffer); padding rows zeroed; the other nodes untouched."""
    images, captions, lens, weight, bias = problem(3, n_img=3, n_cap=7, K=5, L=6, d=33, s=20, dtype=dtype)
    gram = local_sim_gram(images)
    want = local_sim_cpu(images, captions, lens, weight, bias, lambda_softmax=9.0, max_tile_bytes=3000)
    for node_dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        nodes = torch.full((3, 7, 9, 20), 5.0, dtype=node_dtype)
        view = nodes[:, :, 1:7]
        got = local_sim_cpu(images, captions, lens, weight, bias, lambda_softmax=9.0, max_tile_bytes=3000, out=view,
                            gram=gram)
        assert got is view
        assert torch.equal(view, want.to(node_dtype)), node_dtype
        assert (nodes[:, :, 0] == 5).all() and (nodes[:, :, 7:] == 5).all()
    transposed = torch.zeros(7, 3, 6, 20, dtype=torch.float32).transpose(0, 1)     # pair axes swapped in memory
    local_sim_cpu(images, captions, lens, weight, bias, lambda_softmax=9.0, out=transposed)
    assert torch.equal(transposed, want.float())
    with pytest.raises(ValueError, match="out must be"):
        local_sim_cpu(images, captions, lens, weight, bias, lambda_softmax=9.0, out=nodes[:, :, 1:6])
    with pytest.raises(ValueError, match="gram must be"):
        local_sim_cpu(images, captions, lens, weight, bias, lambda_softmax=9.0, gram=gram[:2])
    with pytest.raises(ValueError, match="gram must be"):
        local_sim_cpu(images, captions, lens, weight, bias, lambda_softmax=9.0, gram=gram.to(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_padding_never_read(dtype):
    """NaN and inf in every padding word change nothing (the words are never read, not even multiplied by 0)."""
    images, captions, lens, weight, bias = problem(11, n_img=3, n_cap=9, K=7, L=11, d=40, s=16, dtype=dtype)
    pad = torch.arange(11)[None, :] >= lens[:, None]
    poisoned = captions.clone()
    poisoned[pad] = float("nan")
    poisoned[pad.nonzero()[::2].unbind(1)] = float("inf")
    clean = captions.clone()
    clean[pad] = 0
    for tile in (None, 1):
        a = local_sim_cpu(images, poisoned, lens, weight, bias, lambda_softmax=9.0, max_tile_bytes=tile)
        assert torch.equal(a, local_sim_cpu(images, clean, lens, weight, bias, lambda_softmax=9.0,
                                            max_tile_bytes=tile))
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("tile", [None, 100_000])
def test_threads_agree(tile):
    """Work items are independent: two threads agree with one (to rounding: with more threads the captions may be
    cut into more blocks, which changes GEMM shapes, not the math)."""
    images, captions, lens, weight, bias = problem(8, n_img=8, n_cap=30, K=36, L=12, d=256, s=64,
                                                   dtype=torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = local_sim_cpu(images, captions, lens, weight, bias, lambda_softmax=9.0, max_tile_bytes=tile)
        torch.set_num_threads(2)
        two = local_sim_cpu(images, captions, lens, weight, bias, lambda_softmax=9.0, max_tile_bytes=tile)
    finally:
        torch.set_num_threads(before)
    assert_close_report(two, one, atol=1e-6, rtol=0, what="2 threads vs 1")
    assert_matches_reference(two, images, captions, lens, weight, bias)


def test_float16_runs_on_torch():
    images, captions, lens, weight, bias = problem(4, d=32, s=8, dtype=torch.float16)
    out = local_sim(images, captions, lens, weight, bias, backend="cpu")
    assert out.dtype == torch.float32
    assert max_err(out, local_sim_reference(images.double(), captions.double(), lens, weight.double(),
                                            bias.double())) < 2e-2


def test_opcheck_cpu_backend():
    images, captions, lens, weight, bias = problem(2, n_img=2, n_cap=3, K=4, L=5, d=6, s=4)
    args = tuple(t.clone().requires_grad_() for t in (images, captions)) + (lens,) + \
        tuple(t.clone().requires_grad_() for t in (weight, bias))
    torch.library.opcheck(local_sim_op, args + (9.0, "cpu", 0))
    torch.library.opcheck(local_sim_op, tuple(a.detach().float() if a.dtype == torch.float64 else a for a in args)
                          + (9.0, "cpu", 1))


@pytest.mark.parametrize("tile", [None, 1])
def test_gradcheck_cpu_backend_float64(tile):
    images, captions, lens, weight, bias = problem(7, n_img=2, n_cap=3, K=3, L=4, d=5, s=4)
    args = tuple(t.clone().requires_grad_() for t in (images, captions, weight, bias))
    fn = lambda im, cap, w, b: local_sim(im, cap, lens, w, b, backend="cpu", max_tile_bytes=tile)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_python_boundary_errors(monkeypatch):
    from itm_kernels._common import dispatch

    images, captions, lens, weight, bias = problem(0, n_img=2, n_cap=3, K=4, L=5, d=6, s=4)
    with monkeypatch.context() as m:
        m.setattr(dispatch, "has_cpu_op", lambda op: False)    # the one check every path asks
        with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors and the compiled extension"):
            local_sim(images, captions, lens, weight, bias, backend="cpu")
        assert torch.equal(local_sim(images, captions, lens, weight, bias),          # "auto" falls back to "torch"
                           local_sim(images, captions, lens, weight, bias, backend="torch"))
    with pytest.raises(ValueError, match="max_tile_bytes"):
        local_sim(images, captions, lens, weight, bias, backend="cpu", max_tile_bytes=0)
    with pytest.raises(ValueError, match="1..5"):
        local_sim(images, captions, [1, 6, 2], weight, bias, backend="cpu")


def op_args(**change):
    """Valid arguments of torch.ops.itm_kernels.local_sim_cpu_ (float32), with some replaced."""
    images, captions, lens, weight, bias = problem(0, n_img=2, n_cap=3, K=4, L=5, d=6, s=4, dtype=torch.float32)
    a = dict(out=torch.empty(2, 3, 5, 4), images=images, captions=captions, cap_lens=lens, weight=weight,
             bias=bias, gram=local_sim_gram(images), lambda_softmax=9.0, max_tile_bytes=0)
    a.update(change)
    return a


@pytest.mark.parametrize("change, match", [
    (dict(images=torch.zeros(2, 4, 6, dtype=torch.float16)), "images must be float32, bfloat16 or float64"),
    (dict(images=torch.zeros(2, 4)), "images must have 3 dimensions"),
    (dict(images=torch.zeros(2, 6, 4).transpose(1, 2)), "images must be contiguous"),
    (dict(images=torch.zeros(2, 0, 6)), r"images must be \(N_img, K >= 1"),
    (dict(captions=torch.zeros(3, 5, 6, dtype=torch.float64)), "captions must be Float"),
    (dict(captions=torch.zeros(3, 5, 7)), r"captions must be \(N_cap, L, d = 6\)"),
    (dict(weight=torch.zeros(4, 6, dtype=torch.bfloat16)), "weight must be Float"),
    (dict(weight=torch.zeros(4, 5)), r"weight must be \(s >= 1, d = 6\)"),
    (dict(bias=torch.zeros(4, dtype=torch.float64)), "bias must be Float"),
    (dict(bias=torch.zeros(3)), r"bias must be \(s = 4,\)"),
    (dict(gram=torch.zeros(2, 4, 3)), r"gram must be \(N_img, K, K\) = \(2, 4, 4\)"),
    (dict(gram=torch.zeros(2, 4, 4, dtype=torch.float64)), "gram must be Float"),
    (dict(cap_lens=torch.tensor([1, 2, 3], dtype=torch.int32)), "cap_lens must be Long"),
    (dict(cap_lens=torch.tensor([1, 2])), "cap_lens must have N_cap = 3 entries"),
    (dict(cap_lens=torch.tensor([1, 0, 3])), r"cap_lens\[1\] = 0 is outside 1..5"),
    (dict(cap_lens=torch.tensor([1, 6, 3])), r"cap_lens\[1\] = 6 is outside 1..5"),
    (dict(out=torch.empty(2, 3, 5, 4, dtype=torch.float16)), "out must be float32, float64 or bfloat16"),
    (dict(out=torch.empty(2, 3, 4, 4)), r"out must be \(N_img, N_cap, L, s\) = \(2, 3, 5, 4\)"),
    (dict(out=torch.empty(2, 3, 4, 5).transpose(2, 3)), "last stride 1"),
    (dict(out=torch.empty(2, 1, 5, 4).expand(2, 3, 5, 4)), "out must not have elements sharing memory"),
    (dict(lambda_softmax=float("nan")), "lambda_softmax must be finite"),
    (dict(max_tile_bytes=-1), "max_tile_bytes must be >= 0"),
])
def test_op_boundary_errors(change, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.itm_kernels.local_sim_cpu_(**op_args(**change))


@pytest.mark.parametrize("env_var", ["ITM_CPU_BF16_VNNI", "ITM_CPU_LS_NATIVE_BF16"])
def test_bfloat16_fallback_paths(env_var):
    """The bfloat16 code paths this machine would not take, forced: without brgemm's VNNI path, bfloat16 features
    run as float32 products of the same values; without AVX512-BF16, (a^ - e)^2 is rounded by portable vector
    code. Both within the bfloat16 rule (in a subprocess: the choices are made once per process)."""
    code = ("import sys, torch; sys.path[:0] = ['tests', 'tests/local_sim']; "
            "from test_local_sim import problem; from test_local_sim_cpu import assert_matches_reference; "
            "from itm_kernels.local_sim import local_sim_cpu; "
            "a = problem(5, n_img=3, n_cap=6, K=7, L=9, d=65, s=12, dtype=torch.bfloat16); "
            "assert_matches_reference(local_sim_cpu(*a, lambda_softmax=9.0), *a); print('ok')")
    env = dict(os.environ, PYTHONPATH=str(REPO), **{env_var: "0"})
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
