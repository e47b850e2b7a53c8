"""Retrieval metrics: golden files of the official SCAN / SGRAF evaluation, a slow restatement of the official
``i2t`` / ``t2i`` loops under hypothesis (with deliberate ties), hand-computed cases, fold5 slicing, input checks."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itm_models.eval import metrics as M
from itm_models.eval.metrics import ensemble_sims, format_metrics_table, recall, recall_fold5

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "reference", "golden")
if not os.path.isdir(GOLDEN):
    GOLDEN = "/work/shared/reference/golden"

CI = settings(derandomize=True, max_examples=50, deadline=None)


# --------------------------------------------------------------------------------------------------------------
# Slow reference: the official loops, with a stable argsort so that ties are deterministic.
# --------------------------------------------------------------------------------------------------------------
def slow_official(sims: np.ndarray, cpi: int):
    n_img = sims.shape[0]
    i2t_ranks, i2t_top1 = np.zeros(n_img), np.zeros(n_img)
    for i in range(n_img):
        inds = np.argsort(sims[i], kind="stable")[::-1]
        rank = 1e20
        for c in range(cpi * i, cpi * i + cpi):
            tmp = np.where(inds == c)[0][0]
            rank = min(rank, tmp)
        i2t_ranks[i], i2t_top1[i] = rank, inds[0]
    t2i_ranks, t2i_top1 = np.zeros(cpi * n_img), np.zeros(cpi * n_img)
    d = sims.T
    for c in range(cpi * n_img):
        inds = np.argsort(d[c], kind="stable")[::-1]
        t2i_ranks[c] = np.where(inds == c // cpi)[0][0]
        t2i_top1[c] = inds[0]

    def summary(r):
        return [
            100.0 * len(np.where(r < 1)[0]) / len(r),
            100.0 * len(np.where(r < 5)[0]) / len(r),
            100.0 * len(np.where(r < 10)[0]) / len(r),
            np.floor(np.median(r)) + 1,
            r.mean() + 1,
        ]

    vals = summary(i2t_ranks) + summary(t2i_ranks)
    metrics = dict(zip(M.METRIC_KEYS[:-1], vals))
    metrics["rsum"] = sum(vals[0:3]) + sum(vals[5:8])
    return metrics, {"i2t_ranks": i2t_ranks, "i2t_top1": i2t_top1, "t2i_ranks": t2i_ranks, "t2i_top1": t2i_top1}


def assert_same(got, want, label=""):
    gm, gr = got
    wm, wr = want
    for k in M.METRIC_KEYS:
        assert gm[k] == pytest.approx(wm[k], rel=1e-12, abs=1e-12), f"{label} {k}: {gm[k]} != {wm[k]}"
    for k in wr:
        g, w = np.asarray(gr[k]), np.asarray(wr[k])
        bad = np.flatnonzero(g != w)
        assert bad.size == 0, (
            f"{label} {k}: {bad.size} mismatches, first at {bad[:5].tolist()}: got {g[bad[:5]].tolist()} "
            f"want {w[bad[:5]].tolist()}"
        )


# --------------------------------------------------------------------------------------------------------------
# Golden files
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["scan_checkpoint_golden.npz", "sgraf_checkpoint_golden.npz"])
def test_golden_metrics_exact(name):
    path = os.path.join(GOLDEN, name)
    if not os.path.isfile(path):
        pytest.skip(f"golden file missing: {path}")
    z = np.load(path)
    metrics, ranks = recall(z["sims"], captions_per_image=5, return_ranks=True)
    for k in M.METRIC_KEYS:
        assert metrics[k] == float(z[f"metric_{k}"]), (k, metrics[k], float(z[f"metric_{k}"]))
        assert isinstance(metrics[k], float)
    for k in ("i2t_ranks", "i2t_top1", "t2i_ranks", "t2i_top1"):
        np.testing.assert_array_equal(ranks[k], z[k], err_msg=k)
    # the same through torch, float32 and float64 (the rank margins are far above float32 rounding)
    m32 = recall(torch.from_numpy(z["sims"]).float())
    assert m32 == metrics
    assert recall(z["sims"]) == metrics


# --------------------------------------------------------------------------------------------------------------
# Property tests against the slow official loop
# --------------------------------------------------------------------------------------------------------------
@st.composite
def score_matrices(draw):
    n_img = draw(st.integers(1, 9))
    cpi = draw(st.sampled_from([1, 2, 5]))
    levels = draw(st.sampled_from([2, 3, 5, 1000]))  # few levels: many ties
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    sims = rng.integers(0, levels, size=(n_img, cpi * n_img)).astype(np.float64)
    if draw(st.booleans()):
        sims = sims / levels - 0.3  # non-integer values, still tied
    return sims, cpi


@CI
@given(score_matrices())
def test_ranks_match_official_loop_with_ties(case):
    sims, cpi = case
    assert_same(recall(sims, cpi, return_ranks=True), slow_official(sims, cpi), "numpy")


@CI
@given(score_matrices(), st.integers(1, 12))
def test_blocking_does_not_change_ranks(case, block):
    sims, cpi = case
    want = slow_official(sims, cpi)
    old = M._BLOCK_ELEMENTS
    M._BLOCK_ELEMENTS = block  # many row blocks, and several column chunks for tie resolution
    try:
        got = recall(sims, cpi, return_ranks=True)
    finally:
        M._BLOCK_ELEMENTS = old
    assert_same(got, want, f"block={block}")


def test_untied_random_float32_matches_official():
    rng = np.random.default_rng(3)
    sims = rng.standard_normal((40, 200), dtype=np.float32)
    assert_same(recall(sims, return_ranks=True), slow_official(sims, 5), "float32")
    # default (unstable) argsort agrees too when nothing ties
    inds = np.argsort(sims[0])[::-1]
    assert recall(sims, return_ranks=True)[1]["i2t_top1"][0] == inds[0]


# --------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------------------------
def test_hand_computed_two_images():
    # captions 0,1 -> image 0; captions 2,3 -> image 1 (captions_per_image=2)
    sims = np.array(
        [
            [0.1, 0.9, 0.5, 0.2],  # image 0: best own caption 1 (0.9) is first -> rank 0, top1 = 1
            [0.8, 0.3, 0.4, 0.1],  # image 1: order 0(.8) 2(.4) 1(.3) 3(.1): best own = caption 2, rank 1
        ]
    )
    m, r = recall(sims, 2, return_ranks=True)
    np.testing.assert_array_equal(r["i2t_ranks"], [0, 1])
    np.testing.assert_array_equal(r["i2t_top1"], [1, 0])
    # t2i: col 0 -> image 0: 0.1 vs 0.8 -> rank 1; col 1: 0.9 vs 0.3 -> 0; col 2 -> image 1: 0.4 vs 0.5 -> 1;
    # col 3 -> image 1: 0.1 vs 0.2 -> 1
    np.testing.assert_array_equal(r["t2i_ranks"], [1, 0, 1, 1])
    np.testing.assert_array_equal(r["t2i_top1"], [1, 0, 0, 0])
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0 and m["i2t_medr"] == 1.0 and m["i2t_meanr"] == 1.5
    assert m["t2i_r1"] == 25.0 and m["t2i_r5"] == 100.0 and m["t2i_medr"] == 2.0 and m["t2i_meanr"] == 1.75
    assert m["rsum"] == 50.0 + 100 + 100 + 25 + 100 + 100


def test_tie_rule_higher_index_first():
    # one image, 5 captions all equal: argsort(...)[::-1] puts caption 4 first -> i2t rank 0, top1 4
    m, r = recall(np.zeros((1, 5)), return_ranks=True)
    assert r["i2t_ranks"][0] == 0 and r["i2t_top1"][0] == 4
    # three images, all scores equal: caption c of image j has rank (n_img - 1 - j) (higher image index first)
    m, r = recall(np.ones((3, 15)), return_ranks=True)
    np.testing.assert_array_equal(r["t2i_ranks"], np.repeat([2, 1, 0], 5))
    np.testing.assert_array_equal(r["t2i_top1"], np.full(15, 2))
    np.testing.assert_array_equal(r["i2t_ranks"], [10, 5, 0])  # best own caption 4/9/14; later captions first
    np.testing.assert_array_equal(r["i2t_top1"], [14, 14, 14])


def test_median_floor_and_mean():
    # 4 images, cpi 1; diagonal ranks 0, 1, 2, 3 -> median 1.5 -> floor + 1 = 2, mean 1.5 + 1
    n = 4
    sims = np.zeros((n, n))
    for i in range(n):
        row = np.arange(n, 0, -1, dtype=float)  # caption 0 highest
        sims[i] = row
    m = recall(sims, 1)
    assert m["i2t_medr"] == 2.0 and m["i2t_meanr"] == 2.5


# --------------------------------------------------------------------------------------------------------------
# fold5
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_folds,fold_imgs", [(5, 3), (2, 4), (1, 6)])
def test_fold5_uses_only_diagonal_blocks(n_folds, fold_imgs):
    rng = np.random.default_rng(n_folds)
    n_img = n_folds * fold_imgs
    sims = rng.standard_normal((n_img, 5 * n_img))
    poisoned = sims.copy()
    for f in range(n_folds):
        rows = slice(f * fold_imgs, (f + 1) * fold_imgs)
        mask = np.ones(5 * n_img, dtype=bool)
        mask[f * fold_imgs * 5:(f + 1) * fold_imgs * 5] = False
        poisoned[rows, mask] = 1e6  # off-fold entries would dominate every ranking if read
    mean, folds = recall_fold5(poisoned, n_folds=n_folds, return_folds=True)
    assert len(folds) == n_folds
    expect = [
        recall(sims[f * fold_imgs:(f + 1) * fold_imgs, f * fold_imgs * 5:(f + 1) * fold_imgs * 5])
        for f in range(n_folds)
    ]
    for k in M.METRIC_KEYS[:-1]:
        assert mean[k] == pytest.approx(np.mean([e[k] for e in expect]), abs=1e-12)
    assert mean["rsum"] == pytest.approx(sum(mean[k] for k in M._RECALL_KEYS), abs=1e-12)
    if n_folds == 1:
        assert mean == recall(sims)


def test_fold5_rejects_indivisible():
    with pytest.raises(ValueError, match="n_folds=5"):
        recall_fold5(np.zeros((7, 35)))


# --------------------------------------------------------------------------------------------------------------
# Inputs and helpers
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sims,kwargs,match",
    [
        (np.zeros(10), {}, "sims must be 2-D"),
        (np.zeros((2, 5, 1)), {}, "sims must be 2-D"),
        (np.zeros((0, 0)), {}, "sims is empty"),
        (np.zeros((2, 9)), {}, r"N_cap must equal captions_per_image \* N_img = 5 \* 2 = 10"),
        (np.zeros((2, 10)), {"captions_per_image": 0}, "captions_per_image"),
        (np.zeros((2, 10)), {"captions_per_image": 2.5}, "captions_per_image"),
        (np.array([["a"] * 5]), {}, "real numbers"),
    ],
)
def test_invalid_inputs(sims, kwargs, match):
    with pytest.raises(ValueError, match=match):
        recall(sims, **kwargs)


@pytest.mark.parametrize("value,pos", [(np.nan, (1, 3)), (np.inf, (0, 7)), (-np.inf, (1, 6))])
def test_non_finite_named_with_position(value, pos):
    sims = np.zeros((2, 10))
    sims[pos] = value
    with pytest.raises(ValueError, match=rf"non-finite value at \({pos[0]}, {pos[1]}\)"):
        recall(sims)


def test_input_types_agree(tmp_path):
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((6, 30))
    want = recall(sims, return_ranks=True)
    assert_same(recall(torch.from_numpy(sims), return_ranks=True), want, "torch")
    assert_same(recall(sims.astype(np.float32), return_ranks=True), want, "float32")
    assert_same(recall(torch.from_numpy(sims).requires_grad_(), return_ranks=True), want, "grad")
    path = tmp_path / "sims.npy"
    np.save(path, sims)
    assert_same(recall(np.load(path, mmap_mode="r"), return_ranks=True), want, "memmap")
    ints = (sims * 100).astype(np.int64)
    assert_same(recall(ints, return_ranks=True), slow_official(ints.astype(float), 5), "int")
    assert_same(recall(np.asfortranarray(sims), return_ranks=True), want, "fortran")


def test_ensemble_sims():
    a = np.arange(10.0).reshape(2, 5)
    b = np.ones((2, 5))
    np.testing.assert_allclose(ensemble_sims([a, b]), (a + b) / 2)
    t = ensemble_sims([torch.from_numpy(a), torch.from_numpy(b)])
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), (a + b) / 2)
    assert ensemble_sims([a.astype(np.float32)]).dtype == np.float32
    with pytest.raises(ValueError, match="list_of_sims is empty"):
        ensemble_sims([])
    with pytest.raises(ValueError, match="mismatched shapes"):
        ensemble_sims([a, np.ones((2, 4))])


def test_format_metrics_table():
    m = recall(np.eye(4, 20) + np.arange(20) * 1e-3)
    text = format_metrics_table(m, title="demo")
    lines = text.splitlines()
    assert lines[0] == "demo" and "R@1" in lines[1] and lines[2].startswith("i2t") and lines[3].startswith("t2i")
    assert lines[-1] == f"rsum {m['rsum']:.2f}"
    with pytest.raises(ValueError, match="missing keys"):
        format_metrics_table({"i2t_r1": 1.0})
