"""Streamed recall / top-k (itm_models.eval.streaming) against metrics.recall and topk of the full matrix."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import itm_kernels
from itm_models.eval.metrics import recall
from itm_models.eval.streaming import (model_tile_fn, save_sims_npy, similarity_topk, streaming_recall,
                                       streaming_topk, xattn_tile_fn)

from tests.xattn_topk.topk_helpers import make, ref_topk


def matrix_tile_fn(m):
    t = torch.as_tensor(m)
    return lambda i0, i1, c0, c1: t[i0:i1, c0:c1]


@given(n_img=st.integers(1, 9), cpi=st.integers(1, 5), levels=st.integers(1, 4), seed=st.integers(0, 999),
       ic=st.integers(1, 10), cc=st.integers(1, 17))
def test_streamed_recall_equals_recall_with_ties(n_img, cpi, levels, seed, ic, cc):
    """Scores from a few levels only: ties everywhere, ground truth included."""
    rng = np.random.default_rng(seed)
    m = rng.integers(0, levels, size=(n_img, n_img * cpi)).astype(np.float32)
    exp, exp_r = recall(m, cpi, return_ranks=True)
    got, got_r = streaming_recall(matrix_tile_fn(m), n_img, cpi, img_chunk=ic, cap_chunk=cc, return_ranks=True)
    assert got == exp
    np.testing.assert_array_equal(got_r["i2t_ranks"], exp_r["i2t_ranks"])
    np.testing.assert_array_equal(got_r["t2i_ranks"], exp_r["t2i_ranks"])


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_streamed_recall_xattn_cpu_equals_full(direction):
    im, cap, lens = make(7, 35, 4, 6, 11, 3, True)
    full = itm_kernels.xattn_sim(im, cap, lens, direction=direction, backend="cpu")
    got = streaming_recall(xattn_tile_fn(im, cap, lens, direction=direction, backend="cpu"), 7, 5,
                           img_chunk=3, cap_chunk=8)
    assert got == recall(full, 5)


@given(n_img=st.integers(1, 6), n_cap=st.integers(1, 11), seed=st.integers(0, 99),
       queries=st.sampled_from(["images", "captions"]), kfrac=st.floats(0, 1), ic=st.integers(1, 7),
       cc=st.integers(1, 12))
def test_streaming_topk_equals_full(n_img, n_cap, seed, queries, kfrac, ic, cc):
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 3, size=(n_img, n_cap)).astype(np.float32)
    full = torch.from_numpy(m if queries == "images" else m.T.copy())
    k = 1 + int(kfrac * (full.shape[1] - 1))
    v, i = streaming_topk(matrix_tile_fn(m), n_img, n_cap, k, queries=queries, img_chunk=ic, cap_chunk=cc)
    rv, ri = ref_topk(full, k)
    assert torch.equal(v, rv) and torch.equal(i, ri)


def test_non_finite_score_is_named():
    m = np.zeros((2, 10), np.float32)
    m[1, 7] = np.nan
    with pytest.raises(ValueError, match=r"non-finite value at \(1, 7\)"):
        streaming_recall(matrix_tile_fn(m), 2, 5, img_chunk=1, cap_chunk=3)


@pytest.mark.parametrize("bad", [dict(n_img=0), dict(img_chunk=0), dict(cap_chunk=-2), dict(captions_per_image=0)])
def test_bad_sizes(bad):
    kw = dict(n_img=2, captions_per_image=5, img_chunk=1, cap_chunk=3) | bad
    with pytest.raises(ValueError, match="must be a positive int"):
        streaming_recall(matrix_tile_fn(np.zeros((2, 10), np.float32)), **kw)


def test_bad_k_streaming():
    f = matrix_tile_fn(np.zeros((2, 10), np.float32))
    for k in (0, -1, 11):
        with pytest.raises(ValueError, match=r"k must lie in 1\.\.10"):
            streaming_topk(f, 2, 10, k)
    with pytest.raises(ValueError, match=r"k must lie in 1\.\.2"):
        streaming_topk(f, 2, 10, 3, queries="captions")


def test_save_sims_npy(tmp_path):
    m = np.random.default_rng(0).standard_normal((5, 25)).astype(np.float32)
    save_sims_npy(matrix_tile_fn(m), 5, 25, tmp_path / "s.npy", img_chunk=2, cap_chunk=7)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), m)


@pytest.mark.parametrize("name", ["sgraf", "gsmn"])
def test_model_heads_stream(name):
    """SGRAF and GSMN heads through model_tile_fn: streamed top-k / recall equal the full head matrix."""
    from tests.scale.helpers import small_model_and_embs
    model, img, cap, lens, graph = small_model_and_embs(name)
    kw = {} if graph is None else {"graph_inputs": graph}
    tile = model_tile_fn(model, img, cap, lens, **kw)
    n_img, n_cap = img.shape[0], cap.shape[0]
    full = tile(0, n_img, 0, n_cap)
    # same-grid exactness (heads may round differently per batch); and the one-call matrix where they do not
    grid_full = torch.cat([torch.cat([tile(i, min(n_img, i + 2), c, min(n_cap, c + 4))
                                      for c in range(0, n_cap, 4)], 1) for i in range(0, n_img, 2)], 0)
    v, i = similarity_topk(model, img, cap, lens, 3, img_chunk=2, cap_chunk=4, **kw)
    rv, ri = ref_topk(grid_full, 3)
    assert torch.equal(v, rv) and torch.equal(i, ri)
    got = streaming_recall(tile, n_img, n_cap // n_img, img_chunk=2, cap_chunk=4)
    assert got == recall(grid_full, n_cap // n_img)
    torch.testing.assert_close(grid_full, full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cross_attn, agg_func, norm", [("t2i", "LogSumExp", "clipped_l2norm"),
                                                        ("i2t", "Mean", "softmax")])
@pytest.mark.parametrize("queries", ["images", "captions"])
def test_scan_topk_goes_through_the_kernel(cross_attn, agg_func, norm, queries, monkeypatch):
    """A single SCAN model: similarity_topk takes SCAN.topk (xattn_topk's in-kernel top-k on the cpu backend) and
    equals the top-k of the model's full matrix (float32: bitwise) and the tile-streamed path; ties included."""
    from itm_kernels.xattn_topk import cpu as cpu_topk
    from itm_models import SCAN, SCANConfig
    model = SCAN(SCANConfig(vocab_size=9, img_dim=8, embed_size=16, word_dim=8, cross_attn=cross_attn,
                            agg_func=agg_func, raw_feature_norm=norm), backend="cpu")
    im, cap, lens = make(7, 21, 5, 6, 16, 4, True)
    full = model.sims(im, cap, lens)
    full = full if queries == "images" else full.t()
    calls = []
    real = cpu_topk.xattn_topk
    monkeypatch.setattr(cpu_topk, "xattn_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for k in (1, 5, full.shape[1]):
        v, i = similarity_topk(model, im, cap, lens, k, queries=queries)
        rv, ri = ref_topk(full, k)
        assert v.dtype == torch.float64 and torch.equal(v, rv) and torch.equal(i, ri), k
        sv, si = streaming_topk(model_tile_fn(model, im, cap, lens), 7, 21, k, queries=queries, img_chunk=3,
                                cap_chunk=4)
        assert torch.equal(v, sv) and torch.equal(i, si), k
    assert len(calls) == 3, "SCAN's top-k did not go through the in-kernel top-k"
