"""The Triton in-kernel top-k (``itm_kernels.xattn_topk(..., backend="triton")``, itm_kernels/xattn_topk/triton.py)
in the Triton interpreter on CPU tensors (compiled and run on a GPU by the ``gpu`` re-run and tools/gpu_check.py;
compiled for sm_80/sm_90 by tools/compile_check_triton.py).

Exactness: the kernel scores with the Triton ``xattn_sim`` forward's own device function and launch configuration,
so its values equal ``torch.topk`` of ``xattn_sim(backend="triton")``'s matrix bitwise, and its indices follow the
library's tie order on that matrix (higher index first, NaN above every number). Against the float64 reference
(on the inputs rounded to their dtype): |diff| <= TOL32 (1 + |truth|), the Triton forward's tolerance, for
float32 and for bfloat16/float16 (exact products, float32 accumulation). Padding (captions and images) is
poisoned with NaN and +-Inf.

``TRITON_INTERPRET=1`` is set before triton's first import (see tests/xattn_sim/test_xattn_sim_triton.py); if
triton was imported earlier without it, the kernel tests run in a child pytest.
"""
import json
import os
import subprocess
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

pytest.importorskip("triton")

import itm_kernels  # noqa: E402
from itm_kernels.xattn_sim import reference  # noqa: E402
from itm_kernels.xattn_topk import TRITON_MAX_K  # noqa: E402
from itm_kernels.xattn_topk import triton as topk_triton  # noqa: E402
from kernel_helpers import TRITON_TOOL, run_kernel_tests_in_child, triton_mode  # noqa: E402
from tests.xattn_topk.topk_helpers import make, poison_images, ref_topk  # noqa: E402

_MODE = triton_mode()
DEVICE, KERNELS_HERE, needs_kernels = _MODE.DEVICE, _MODE.KERNELS_HERE, _MODE.needs_kernels
TOL32 = 1e-5
NORMS = ["clipped_l2norm", "softmax", "l1norm", "clipped_l1norm", "l2norm", "clipped", "no_norm"]


def _inputs(n_img, n_cap, K, L, d, seed, dup, ragged_img, dtype):
    """Seeded inputs with poisoned padding on both sides; also the clean (padding 0) float64 copies."""
    im, cap, lens = make(n_img, n_cap, K, L, d, seed, dup)
    g = torch.Generator().manual_seed(seed + 1)
    img_lens = torch.full((n_img,), K)
    if ragged_img:
        img_lens = torch.randint(1, K + 1, (n_img,), generator=g)
        img_lens[0] = K
        if dup and n_img > 1:
            img_lens[-1] = img_lens[0]
        im = poison_images(im, img_lens, seed)
    clean_im = im.masked_fill((torch.arange(K)[None, :] >= img_lens[:, None])[..., None], 0.0)
    clean_cap = cap.masked_fill((torch.arange(L)[None, :] >= lens[:, None])[..., None], 0.0)
    return im.to(dtype), cap.to(dtype), lens, img_lens, clean_im.to(dtype).double(), clean_cap.to(dtype).double()


def _check(im, cap, lens, img_lens, clean_im, clean_cap, ks, queries, opts, **topk_opts):
    """The kernel's top-k for each (k, query_chunk) in ``ks`` against torch.topk / the tie order of the Triton
    matrix (exactly) and the reference."""
    dev = dict(images=im.to(DEVICE), captions=cap.to(DEVICE), cap_lens=lens.to(DEVICE),
               img_lens=img_lens.to(DEVICE))
    full = itm_kernels.xattn_sim(**dev, backend="triton", **opts).cpu()
    truth = reference.xattn_sim(clean_im, clean_cap, lens, img_lens=img_lens, **opts)
    if queries == "captions":
        full, truth = full.t(), truth.t()
    for k, qc in ks:
        v, i = itm_kernels.xattn_topk(dev["images"], dev["captions"], dev["cap_lens"], k, img_lens=dev["img_lens"],
                                      queries=queries, backend="triton", query_chunk=qc, **opts, **topk_opts)
        v, i = v.cpu(), i.cpu()
        assert v.dtype == torch.float32 and i.dtype == torch.long and v.shape == i.shape == (full.shape[0], k)
        top = full.topk(k, dim=1).values
        assert torch.equal(v, top), f"k={k}: values differ: max {(v - top).abs().max()}"
        rv, ri = ref_topk(full, k)
        assert torch.equal(i, ri), f"k={k}: indices differ at {torch.nonzero(i != ri)[:5].tolist()}"
        tv = ref_topk(truth, k)[0]
        bad = (v.double() - tv).abs() > TOL32 * (1 + tv.abs())
        assert not bad.any(), f"k={k}: vs reference: max diff {(v.double() - tv).abs().max():.3e}"


@needs_kernels
@settings(max_examples=6)
@given(n_img=st.integers(1, 4), n_cap=st.integers(1, 7), K=st.integers(1, 4), L=st.integers(1, 20),
       d=st.integers(1, 12), seed=st.integers(0, 99), dup=st.booleans(), ragged_img=st.booleans(),
       queries=st.sampled_from(["images", "captions"]), direction=st.sampled_from(["t2i", "i2t"]),
       norm=st.sampled_from(NORMS), agg=st.sampled_from(["lse", "mean", "max", "sum"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), kfrac=st.floats(0, 1))
def test_kernel_topk_equals_topk_of_triton_matrix(n_img, n_cap, K, L, d, seed, dup, ragged_img, queries, direction,
                                                  norm, agg, dtype, kfrac):
    """Shapes with captions in one or two length buckets (L up to 20), k from 1 to the gallery size (<= 7 < TRITON_MAX_K,
    so always the kernel: ``method="kernel"``), both ranked sides, every norm/agg/direction, three dtypes."""
    im, cap, lens, img_lens, clean_im, clean_cap = _inputs(n_img, n_cap, K, L, d, seed, dup, ragged_img, dtype)
    n_g = n_cap if queries == "images" else n_img
    k = 1 + int(kfrac * (n_g - 1))
    opts = dict(direction=direction, norm=norm, agg=agg, lambda_softmax=9.0, lambda_lse=6.0)
    _check(im, cap, lens, img_lens, clean_im, clean_cap, [(k, None)], queries, opts, method="kernel")


@needs_kernels
@pytest.mark.parametrize("direction, queries", [
    ("t2i", "images"), ("i2t", "images"),       # one program per ranked item / per block of QB ranked items
    pytest.param("t2i", "captions", marks=pytest.mark.slow), pytest.param("i2t", "captions", marks=pytest.mark.slow)])
def test_many_merges_buckets_and_query_chunks(direction, queries):
    """A gallery of 11 (several buffer merges for k = 3: KP = 4), captions in three length buckets (1..16, 17..32,
    33..40 words: separate launches continue one running top-k), exact ties (repeated captions and images),
    query_chunk splitting the queries; k = the whole gallery (5 images, or 11 captions <= TRITON_MAX_K)."""
    im, _, _, img_lens, clean_im, _ = _inputs(5, 11, 3, 40, 7, 3, True, True, torch.float32)
    g = torch.Generator().manual_seed(5)
    cap = torch.randn(11, 40, 7, generator=g)
    lens = torch.tensor([40, 17, 2, 33, 40, 9, 40, 25, 40, 1, 40])
    cap[4::2] = cap[0]                          # captions 0, 4, 6, 8, 10 identical: exact ties
    for c in range(11):
        cap[c, int(lens[c]):] = float("nan") if c % 2 else float("inf")
    clean_cap = cap.masked_fill((torch.arange(40)[None, :] >= lens[:, None])[..., None], 0.0).double()
    opts = dict(direction=direction, norm="clipped_l2norm", agg="lse", lambda_softmax=9.0, lambda_lse=6.0)
    n_g = 11 if queries == "images" else 5
    _check(im, cap, lens, img_lens, clean_im, clean_cap, [(3, None), (n_g, 2)], queries, opts, method="kernel")


@needs_kernels
def test_nan_scores_rank_first_and_match_the_stream():
    """Valid features that are NaN give NaN scores: they rank above every number, NaN ties by the higher index
    first, as the streaming driver over the same backend (torch.sort) orders them."""
    im, cap, lens = make(3, 7, 2, 3, 5, 1, False)
    cap[2, 0] = float("nan")
    cap[6, 0] = float("nan")
    im[1, 0] = float("nan")
    im, cap, lens = im.to(DEVICE), cap.to(DEVICE), lens.to(DEVICE)
    for queries in ("images", "captions"):
        for k in (1, 3):
            v, i = itm_kernels.xattn_topk(im, cap, lens, k, queries=queries, backend="triton", method="kernel")
            sv, si = itm_kernels.xattn_topk(im, cap, lens, k, queries=queries, backend="triton", method="stream")
            assert torch.equal(i, si), (queries, k)
            assert torch.equal(v.isnan(), sv.isnan()) and torch.equal(v[~v.isnan()], sv[~sv.isnan()])
    v, i = itm_kernels.xattn_topk(im, cap, lens, 2, backend="triton", method="kernel")
    assert i[0].tolist() == [6, 2] and bool(v[0].isnan().all())


@needs_kernels
def test_large_k_and_float64_take_the_stream():
    """k > TRITON_MAX_K and float64 inputs: "auto" runs the streaming driver over the Triton forward (same
    results as method="stream"); method="kernel" refuses them, naming the bound."""
    im, cap, lens = make(2, TRITON_MAX_K + 2, 2, 3, 4, 0, False)
    im, cap, lens = im.to(DEVICE), cap.to(DEVICE), lens.to(DEVICE)
    k = TRITON_MAX_K + 1
    a = itm_kernels.xattn_topk(im, cap, lens, k, backend="triton")
    b = itm_kernels.xattn_topk(im, cap, lens, k, backend="triton", method="stream")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    full = itm_kernels.xattn_sim(im, cap, lens, backend="triton").cpu()
    assert torch.equal(a[0].cpu(), full.topk(k, dim=1).values)
    with pytest.raises(ValueError, match=f"triton backend with k <= {TRITON_MAX_K} \\(got {k}\\)"):
        itm_kernels.xattn_topk(im, cap, lens, k, backend="triton", method="kernel")
    with pytest.raises(ValueError, match="float32/bfloat16/float16 inputs \\(got torch.float64\\)"):
        itm_kernels.xattn_topk(im.double(), cap.double(), lens, 2, backend="triton", method="kernel")
    v64, _ = itm_kernels.xattn_topk(im.double(), cap.double(), lens, 2, backend="triton")
    assert v64.dtype == torch.float64
    with pytest.raises(ValueError, match=f"the Triton top-k takes k <= {TRITON_MAX_K}"):
        topk_triton.xattn_topk(im, cap, lens, torch.full((2,), 2, device=im.device), k, queries="images",
                               direction="t2i", norm="clipped_l2norm", lambda_softmax=9.0, agg="lse", lambda_lse=6.0)


def _cancelling_gallery(d=8, eps=1e-3):
    """3 images x 4 captions (K = 2, L_max = 2, d = 8) where image 0 (t2i) and caption 1 (i2t) attend to contexts
    that nearly vanish (a region / word and almost its negative), as the issue-14 reproducer: with uniform
    attention the Gram form |a|^2 = alpha^T G alpha cancels in float32 (cosine 1.024 instead of 1.0 unguarded)."""
    g = torch.Generator().manual_seed(3)
    im = torch.nn.functional.normalize(torch.randn(3, 2, d, generator=g), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(4, 2, d, generator=g), dim=-1)
    im[0] = 0.0
    im[0, 0, 0], im[0, 1, 0], im[0, 1, 1] = 1.0, -1.0, eps
    cap[0] = 0.0
    cap[0, :, 1] = 1.0
    cap[1] = 0.0
    cap[1, 0, 0], cap[1, 1, 0], cap[1, 1, 1] = 1.0, -1.0, eps
    im[1] = 0.0
    im[1, :, 1] = 1.0
    return im, cap, torch.tensor([2, 2, 2, 2])


@needs_kernels
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("queries", ["images", "captions"])
def test_gram_guard_in_the_topk_kernel(direction, queries):
    """The top-k kernel's Gram guard (main launch leaves flagged steps out, fix-up launch merges their exact
    scores): on near-cancelling contexts its values are the float64 reference's within TOL32, every k."""
    im, cap, lens = _cancelling_gallery()
    opts = dict(direction=direction, norm="no_norm", lambda_softmax=0.0, agg="mean")
    truth = reference.xattn_sim(im.double(), cap.double(), lens, **opts)
    truth = truth if queries == "images" else truth.t()
    for k in range(1, truth.shape[1] + 1):
        vals, idx = itm_kernels.xattn_topk(im.to(DEVICE), cap.to(DEVICE), lens.to(DEVICE), k, queries=queries,
                                           backend="triton", method="kernel", **opts)
        want = truth.topk(k, dim=1).values
        err = (vals.cpu().double() - want).abs().max().item()
        assert err <= TOL32 * (1 + want.abs().max().item()), f"k={k}: error {err} on cancelling contexts"
        picked = truth.gather(1, idx.cpu())  # the indices name items whose true scores are the top-k's
        assert (picked - want).abs().max().item() <= 2 * TOL32 * (1 + want.abs().max().item())


@pytest.mark.parametrize("k", [0, -1, 6])
def test_bad_k_on_triton(k):
    """k is checked before any kernel: 1..gallery size (5 captions here), on the triton backend too."""
    im, cap, lens = make(2, 5, 2, 3, 4, 0, False)
    with pytest.raises(ValueError, match=f"k must lie in 1..5 \\(the gallery size\\), got {k}"):
        itm_kernels.xattn_topk(im.to(DEVICE), cap.to(DEVICE), lens, k, backend="triton")
    with pytest.raises(TypeError, match="k must be an int"):
        itm_kernels.xattn_topk(im.to(DEVICE), cap.to(DEVICE), lens, 2.0, backend="triton")


def test_key_packing_orders_as_the_library():
    """decode_keys inverts the kernel's packing, and the packed order is (score desc, NaN first, -0 == +0, higher
    index first): the keys are built here with the same formula in torch."""
    vals = torch.tensor([1.5, -0.0, 0.0, float("nan"), -float("inf"), float("inf"), -2.0, 1.5, 1e-45, -1e-45])
    idx = torch.arange(vals.numel())
    v = torch.where(vals == 0, torch.zeros_like(vals), vals)
    bits = v.view(torch.int32)
    key32 = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key32 = torch.where(vals.isnan(), torch.full_like(key32, 0x7FFFFFFF), key32)
    keys = (key32.to(torch.int64) << 32) | idx
    order = keys.argsort(descending=True)
    dv, di = topk_triton.decode_keys(keys[order][None, :], vals.numel())
    assert di[0].tolist() == [3, 5, 7, 0, 8, 2, 1, 9, 6, 4]
    assert dv[0, 0].isnan() and torch.equal(dv[0, 1:], v[di[0, 1:]])


@pytest.mark.skipif(KERNELS_HERE, reason="the kernel tests run in this process")
def test_kernel_tests_in_fresh_interpreter_process():
    """This session imported triton before TRITON_INTERPRET=1 could be set: run the kernel tests in a child."""
    run_kernel_tests_in_child(__file__, "1", no_skips=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_tests_on_gpu_in_fresh_process():
    """The same kernel tests, compiled and run on the GPU."""
    run_kernel_tests_in_child(__file__, "0")


@pytest.mark.slow  # ~2-4 min: 32 compilations
def test_compiles_for_sm80_and_sm90(tmp_path):
    """Both ranked sides, both directions, float32 and bfloat16, k = 1 and TRITON_MAX_K, compiled to cubins for
    sm_80 and sm_90 at SCAN size (tools/compile_check_triton.py, fresh process, empty cache). Register use as
    measured (triton 3.9): 78-209 registers; 8 of the 32 variants (float32 mostly, at <= 128 registers) keep
    8-16 stack bytes per thread, none more: the bound asserted here."""
    sys.path.insert(0, str(TRITON_TOOL.parent))
    import compile_check_triton as tool

    ok, why = tool.cuda_compiler_available()
    if not ok:
        pytest.skip(f"triton's CUDA compiler backend is unavailable: {why}")
    assert tool.TOPK_KS == (1, TRITON_MAX_K)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(TRITON_TOOL), "--json"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout}\n{proc.stderr}"
    results = [r for r in json.loads(proc.stdout.strip().splitlines()[-1]) if r["kernel"].startswith("xattn_topk")]
    assert {(r["kernel"], r["arch"], r["dtype"], r["direction"], r["k"]) for r in results} == {
        (k, a, d, s, kk) for k in tool.TOPK_KERNELS for a in ("sm_80", "sm_90") for d in ("float32", "bfloat16")
        for s in ("t2i", "i2t") for kk in tool.TOPK_KS}
    for info in results:
        assert info["cubin_bytes"] > 0 and info.get("stack", 0) <= 16 and info.get("local", 0) == 0, info


@needs_kernels
@pytest.mark.slow
@settings(max_examples=60)
@given(n_img=st.integers(1, 9), n_cap=st.integers(1, 40), K=st.integers(1, 6), L=st.integers(1, 40),
       d=st.integers(1, 40), seed=st.integers(0, 999), dup=st.booleans(), ragged_img=st.booleans(),
       queries=st.sampled_from(["images", "captions"]), direction=st.sampled_from(["t2i", "i2t"]),
       norm=st.sampled_from(NORMS), agg=st.sampled_from(["lse", "mean", "max", "sum"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), kfrac=st.floats(0, 1),
       qc=st.one_of(st.none(), st.integers(1, 4)))
def test_kernel_topk_sweep(n_img, n_cap, K, L, d, seed, dup, ragged_img, queries, direction, norm, agg, dtype, kfrac,
                           qc):
    """The default test over larger galleries (up to 40: k past TRITON_MAX_K falls back to the stream), three
    caption buckets, query chunks."""
    im, cap, lens, img_lens, clean_im, clean_cap = _inputs(n_img, n_cap, K, L, d, seed, dup, ragged_img, dtype)
    n_g = n_cap if queries == "images" else n_img
    k = 1 + int(kfrac * (n_g - 1))
    opts = dict(direction=direction, norm=norm, agg=agg, lambda_softmax=4.0, lambda_lse=5.0)
    _check(im, cap, lens, img_lens, clean_im, clean_cap, [(k, qc)], queries, opts)
