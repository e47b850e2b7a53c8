"""The in-kernel CPU top-k (``method="kernel"``: csrc/xattn_topk/cpu.cpp through itm_kernels/xattn_topk/cpu.py)
against the top-k of the full ``xattn_sim(backend="cpu")`` matrix: values exactly (bitwise), indices exactly in the
documented tie order (higher index first); against the streaming driver; the C++ boundary checks.

Exactness premise: the kernel scores its tiles with xattn_sim's own tile loop, so every score is the matrix entry
computed with the same tiling. float32 / bfloat16 scores do not depend on the tiling at all (test_xattn_topk.py's
batching test), so any ``max_tile_bytes`` / ``query_chunk`` gives the same bits; float64 scores come from ATen mm,
whose rounding depends on the block shape, so float64 is compared at the same ``max_tile_bytes`` and unchunked.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, strategies as st

import itm_kernels
from itm_kernels.xattn_topk import cpu as cpu_topk
from tests.xattn_topk.topk_helpers import make, poison_images, ref_topk

pytestmark = pytest.mark.skipif(not cpu_topk.available(), reason="needs the compiled xattn_topk_fwd")


@given(n_img=st.integers(1, 7), n_cap=st.integers(1, 13), K=st.integers(1, 5), L=st.integers(1, 6),
       d=st.integers(1, 19), seed=st.integers(0, 99), dup=st.booleans(), ragged_img=st.booleans(),
       queries=st.sampled_from(["images", "captions"]), direction=st.sampled_from(["t2i", "i2t"]),
       norm=st.sampled_from(["clipped_l2norm", "softmax", "l1norm", "no_norm"]),
       agg=st.sampled_from(["lse", "mean", "max", "sum"]), dtype=st.sampled_from([torch.float32, torch.bfloat16,
                                                                                  torch.float64, torch.float16]),
       kfrac=st.floats(0, 1), tile=st.sampled_from([0, 1, 4096]))
def test_kernel_topk_equals_full_matrix(n_img, n_cap, K, L, d, seed, dup, ragged_img, queries, direction, norm, agg,
                                        dtype, kfrac, tile):
    im, cap, lens = make(n_img, n_cap, K, L, d, seed, dup)
    g = torch.Generator().manual_seed(seed + 1)
    img_lens = torch.randint(1, K + 1, (n_img,), generator=g) if ragged_img else None
    if img_lens is not None:
        img_lens[0] = K
        if dup and n_img > 1:
            img_lens[-1] = img_lens[0]
        im = poison_images(im, img_lens, seed)
    im, cap = im.to(dtype), cap.to(dtype)
    opts = dict(img_lens=img_lens, direction=direction, norm=norm, agg=agg, backend="cpu",
                max_tile_bytes=tile or None)
    full = itm_kernels.xattn_sim(im, cap, lens, **opts)
    if queries == "captions":
        full = full.t()
    k = 1 + int(kfrac * (full.shape[1] - 1))
    v, i = itm_kernels.xattn_topk(im, cap, lens, k, queries=queries, method="kernel", **opts)
    rv, ri = ref_topk(full, k)
    assert v.dtype == full.dtype and i.dtype == torch.long and v.shape == i.shape == (full.shape[0], k)
    assert torch.equal(v.double(), rv), f"values differ: max {(v.double() - rv).abs().max()}"
    assert torch.equal(i, ri), f"indices differ at {torch.nonzero(i != ri)[:5].tolist()}"
    assert torch.equal(v, full.topk(k, dim=1).values)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("queries", ["images", "captions"])
def test_kernel_many_tiles_two_threads(direction, queries):
    """Tiles spread over 2 threads (enough work to wake both) and many caption blocks (small max_tile_bytes); the
    per-thread heaps are merged. Every 3rd caption repeats caption 0: exact ties across tiles and threads."""
    g = torch.Generator().manual_seed(3)
    im = torch.randn(40, 36, 64, generator=g)
    cap = torch.randn(300, 12, 64, generator=g)
    lens = torch.randint(1, 13, (300,), generator=g)
    cap[1::3], lens[1::3] = cap[0], lens[0]
    im[20:] = im[:20]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        full = itm_kernels.xattn_sim(im, cap, lens, direction=direction, backend="cpu")
        full = full if queries == "images" else full.t()
        for k in (1, 9, full.shape[1]):
            for qc in (None, 7):
                v, i = itm_kernels.xattn_topk(im, cap, lens, k, queries=queries, direction=direction,
                                              backend="cpu", method="kernel", max_tile_bytes=150_000,
                                              query_chunk=qc)
                rv, ri = ref_topk(full, k)
                assert torch.equal(v.double(), rv) and torch.equal(i, ri), (k, qc)
    finally:
        torch.set_num_threads(before)


def test_auto_picks_kernel_and_matches_stream():
    im, cap, lens = make(5, 11, 4, 5, 8, 0, True)
    a = itm_kernels.xattn_topk(im, cap, lens, 4)
    b = itm_kernels.xattn_topk(im, cap, lens, 4, method="kernel")
    c = itm_kernels.xattn_topk(im, cap, lens, 4, method="stream", gallery_chunk=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and all(torch.equal(x, y) for x, y in zip(a, c))


def test_nan_scores_rank_first_as_torch_topk():
    """Valid features that are NaN give NaN scores: they rank above every number (torch.topk's order), NaN ties by
    the higher index first, as the streaming driver (torch.sort) orders them."""
    im, cap, lens = make(4, 9, 3, 4, 6, 1, False)
    cap[2, 0] = float("nan")
    cap[6, 0] = float("nan")
    im[1, 0] = float("nan")
    for queries in ("images", "captions"):
        for k in (1, 3, 4):
            v, i = itm_kernels.xattn_topk(im, cap, lens, k, queries=queries, method="kernel")
            sv, si = itm_kernels.xattn_topk(im, cap, lens, k, queries=queries, method="stream")
            assert torch.equal(i, si), (queries, k)
            assert torch.allclose(v, sv, equal_nan=True) and torch.equal(v.isnan(), sv.isnan())
    v, i = itm_kernels.xattn_topk(im, cap, lens, 2, method="kernel")
    assert i[0].tolist() == [6, 2] and bool(v[0].isnan().all())


def test_bf16_and_fp16_values_are_float32():
    im, cap, lens = make(3, 6, 3, 4, 5, 2, False)
    for dt in (torch.bfloat16, torch.float16):
        v, i = itm_kernels.xattn_topk(im.to(dt), cap.to(dt), lens, 2, method="kernel")
        assert v.dtype == torch.float32 and i.dtype == torch.long


def test_method_kernel_where_it_does_not_apply():
    im, cap, lens = make(2, 5, 3, 4, 5, 0, False)
    with pytest.raises(ValueError, match="method='kernel' needs the cpu backend"):
        itm_kernels.xattn_topk(im, cap, lens, 2, backend="torch", method="kernel")
    with pytest.raises(ValueError, match="attention='soft'"):
        itm_kernels.xattn_topk(im, cap, lens, 2, method="kernel", attention="hard")
    with pytest.raises(ValueError, match="method must be one of"):
        itm_kernels.xattn_topk(im, cap, lens, 2, method="fused")
    # hard attention on "auto" takes the stream
    v, _ = itm_kernels.xattn_topk(im, cap, lens, 2, attention="hard")
    full = itm_kernels.xattn_sim(im, cap, lens, attention="hard")
    assert torch.equal(v, full.topk(2, dim=1).values)


# --- the C++ boundary: the raw op checks every argument itself ---------------------------------------------------

def _raw(im, cap, lens, img_lens, k, queries_images=True, direction=0, norm=2, lam=9.0, agg=0, lse=6.0, tile=0):
    return torch.ops.itm_kernels.xattn_topk_fwd(im, cap, lens, img_lens, k, queries_images, direction, norm, lam,
                                                agg, lse, tile)


@pytest.fixture
def raw_inputs():
    im, cap, lens = make(3, 7, 4, 5, 6, 0, False)
    return im, cap, lens, torch.full((3,), 4, dtype=torch.long)


@pytest.mark.parametrize("k, queries_images, msg", [
    (0, True, "k must lie in 1..7 (the gallery: N_cap), got 0"),
    (-2, True, "k must lie in 1..7 (the gallery: N_cap), got -2"),
    (8, True, "k must lie in 1..7 (the gallery: N_cap), got 8"),
    (4, False, "k must lie in 1..3 (the gallery: N_img), got 4"),
])
def test_raw_bad_k(raw_inputs, k, queries_images, msg):
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        _raw(*raw_inputs, k, queries_images)


def test_raw_bad_shapes_dtypes_lengths(raw_inputs):
    im, cap, lens, il = raw_inputs
    cases = [
        ((im[0], cap, lens, il, 1), "images must be (N_img, K, d)"),
        ((im, cap[..., :5], lens, il, 1), "images d = 6 but captions d = 5"),
        ((im.double(), cap, lens, il, 1), "images are Double but captions are Float"),
        ((im.int(), cap.int(), lens, il, 1), "features expected"),
        ((im.transpose(0, 1), cap, lens, il, 1), "must be contiguous"),
        ((im, cap, lens.int(), il, 1), "cap_lens must be int64"),
        ((im, cap, lens[:3], il, 1), "cap_lens must have shape (7,)"),
        ((im, cap, lens.clone().fill_(6), il, 1), "cap_lens[0] = 6 is outside 1..5"),
        ((im, cap, lens, il.clone().fill_(0), 1), "img_lens[0] = 0 is outside 1..4"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            _raw(*args)
    with pytest.raises(RuntimeError, match="direction must be 0"):
        _raw(im, cap, lens, il, 1, direction=2)
    with pytest.raises(RuntimeError, match="norm must be in 0..6"):
        _raw(im, cap, lens, il, 1, norm=7)
    with pytest.raises(RuntimeError, match="agg must be in 0..3"):
        _raw(im, cap, lens, il, 1, agg=-1)
    with pytest.raises(RuntimeError, match="lambda_lse must be > 0"):
        _raw(im, cap, lens, il, 1, lse=0.0)
    with pytest.raises(RuntimeError, match="max_tile_bytes must be >= 0"):
        _raw(im, cap, lens, il, 1, tile=-1)


def test_raw_no_queries_gives_empty(raw_inputs):
    im, cap, lens, il = raw_inputs
    v, i = _raw(im[:0], cap, lens, il[:0], 3)
    assert v.shape == i.shape == (0, 3) and i.dtype == torch.long


def test_opcheck(raw_inputs):
    im, cap, lens, il = raw_inputs
    torch.library.opcheck(torch.ops.itm_kernels.xattn_topk_fwd.default, (im, cap, lens, il, 3, False, 0, 2, 9.0, 0,
                                                                         6.0, 0))


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_max_tile_bytes(bad):
    im, cap, lens = make(2, 5, 3, 4, 5, 0, False)
    with pytest.raises(ValueError, match="max_tile_bytes must be a positive int"):
        itm_kernels.xattn_topk(im, cap, lens, 2, max_tile_bytes=bad)
