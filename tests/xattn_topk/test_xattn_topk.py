"""xattn_topk's streaming driver (``method="stream"``, over the ``cpu`` xattn_sim backend) against the top-k of the
full ``xattn_sim`` matrix: values exactly, indices exactly in the documented tie order (higher index first); the
argument checks. The in-kernel top-k: test_xattn_topk_cpu.py."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import itm_kernels
from itm_kernels.xattn_topk.merge import merge_candidates
from tests.xattn_topk.topk_helpers import make, ref_topk


@given(n_img=st.integers(1, 6), n_cap=st.integers(1, 12), K=st.integers(1, 4), L=st.integers(1, 5),
       d=st.integers(1, 9), seed=st.integers(0, 99), dup=st.booleans(), queries=st.sampled_from(["images", "captions"]),
       direction=st.sampled_from(["t2i", "i2t"]), agg=st.sampled_from(["lse", "mean", "max"]),
       kfrac=st.floats(0, 1), qc=st.one_of(st.none(), st.integers(1, 5)), gc=st.one_of(st.none(), st.integers(1, 7)))
def test_topk_equals_full_matrix(n_img, n_cap, K, L, d, seed, dup, queries, direction, agg, kfrac, qc, gc):
    im, cap, lens = make(n_img, n_cap, K, L, d, seed, dup)
    full = itm_kernels.xattn_sim(im, cap, lens, direction=direction, agg=agg, backend="cpu")
    if queries == "captions":
        full = full.t()
    n_g = full.shape[1]
    k = 1 + int(kfrac * (n_g - 1))
    v, i = itm_kernels.xattn_topk(im, cap, lens, k, queries=queries, direction=direction, agg=agg, backend="cpu",
                                  query_chunk=qc, gallery_chunk=gc, method="stream")
    rv, ri = ref_topk(full, k)
    assert v.dtype == full.dtype and i.dtype == torch.long and v.shape == (full.shape[0], k)
    assert torch.equal(v.double(), rv), f"values differ: max {(v.double() - rv).abs().max()}"
    assert torch.equal(i, ri), f"indices differ at {torch.nonzero(i != ri)[:5].tolist()}"
    # and torch.topk's values agree too (its index order among ties is unspecified)
    assert torch.equal(v, full.topk(k, dim=1).values)


def test_cpu_backend_is_batching_invariant():
    """The premise of exactness: a cpu tile equals the same entries of the one-call matrix bitwise."""
    im, cap, lens = make(9, 23, 36, 7, 33, 1, False)
    for direction in ("t2i", "i2t"):
        full = itm_kernels.xattn_sim(im, cap, lens, direction=direction, backend="cpu")
        for i0, i1, c0, c1 in [(0, 2, 0, 5), (3, 9, 10, 23), (8, 9, 22, 23)]:
            t = itm_kernels.xattn_sim(im[i0:i1], cap[c0:c1], lens[c0:c1], direction=direction, backend="cpu")
            assert torch.equal(t, full[i0:i1, c0:c1])


def test_ties_higher_index_first():
    im, cap, lens = make(2, 6, 3, 4, 5, 0, False)
    cap[:] = cap[0]
    lens[:] = lens[0]
    v, i = itm_kernels.xattn_topk(im, cap, lens, 6, backend="cpu", gallery_chunk=2)
    assert torch.equal(i, torch.tensor([[5, 4, 3, 2, 1, 0]] * 2))
    assert torch.equal(v, v[:, :1].expand(2, 6))


def test_merge_candidates_tie_order():
    v = torch.tensor([[1.0, 2.0, 2.0, -torch.inf]])
    i = torch.tensor([[7, 3, 9, -1]])
    mv, mi = merge_candidates(v, i, 3)
    assert mi.tolist() == [[9, 3, 7]] and mv.tolist() == [[2.0, 2.0, 1.0]]


@pytest.mark.parametrize("k", [0, -1, 8])
def test_bad_k_value(k):
    im, cap, lens = make(2, 7, 3, 4, 5, 0, False)
    with pytest.raises(ValueError, match=r"k must lie in 1\.\.7"):
        itm_kernels.xattn_topk(im, cap, lens, k)


def test_bad_k_gallery_depends_on_queries():
    im, cap, lens = make(2, 7, 3, 4, 5, 0, False)
    with pytest.raises(ValueError, match=r"k must lie in 1\.\.2"):
        itm_kernels.xattn_topk(im, cap, lens, 3, queries="captions")


@pytest.mark.parametrize("k", [1.0, "3", True, None])
def test_bad_k_type(k):
    im, cap, lens = make(2, 7, 3, 4, 5, 0, False)
    with pytest.raises(TypeError, match="k must be an int"):
        itm_kernels.xattn_topk(im, cap, lens, k)


def test_bad_queries_and_chunks():
    im, cap, lens = make(2, 7, 3, 4, 5, 0, False)
    with pytest.raises(ValueError, match="queries must be one of"):
        itm_kernels.xattn_topk(im, cap, lens, 1, queries="words")
    with pytest.raises(ValueError, match="gallery_chunk must be a positive int"):
        itm_kernels.xattn_topk(im, cap, lens, 1, gallery_chunk=0)
    with pytest.raises(ValueError, match="cap_lens"):
        itm_kernels.xattn_topk(im, cap, lens[:3], 1)
