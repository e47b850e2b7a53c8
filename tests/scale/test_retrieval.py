"""two_stage retrieval (path: pooled / hard shortlist + the cpu xattn_sim head)."""
from __future__ import annotations

import pytest
import torch

import itm_kernels
from itm_models.retrieval import shortlist_pooled, two_stage

from tests.xattn_topk.topk_helpers import make, ref_topk


class Head:
    def sims(self, img, cap, lens):
        return itm_kernels.xattn_sim(img, cap, lens, backend="cpu")


@pytest.mark.parametrize("method", ["pooled", "hard"])
@pytest.mark.parametrize("queries", ["captions", "images"])
def test_full_shortlist_equals_exact_topk(method, queries):
    im, cap, lens = make(6, 14, 4, 5, 8, 3, True)
    cap = torch.nan_to_num(cap, nan=0.0, posinf=0.0)  # pooled embeddings read only valid words; keep it simple
    full = Head().sims(im, cap, lens)
    full = full.t() if queries == "captions" else full
    n_g = full.shape[1]
    v, i = two_stage(Head(), im, cap, lens, shortlist=n_g, k=3, method=method, queries=queries)
    rv, ri = ref_topk(full, 3)
    assert torch.equal(v.double(), rv) and torch.equal(i, ri)


def test_small_shortlist_results_come_from_it():
    im, cap, lens = make(8, 20, 4, 5, 8, 4, False)
    _, cand = shortlist_pooled(im, cap, lens, 4)
    v, i = two_stage(Head(), im, cap, lens, shortlist=4, k=2)
    assert all(set(i[q].tolist()) <= set(cand[q].tolist()) for q in range(20))
    full = Head().sims(im, cap, lens).t()
    assert torch.equal(v, full.gather(1, i))


def test_pooled_ignores_padding():
    im, cap, lens = make(3, 5, 4, 5, 8, 0, False)
    poisoned = cap.clone()
    for c in range(5):
        poisoned[c, lens[c]:] = float("nan")
    assert torch.equal(shortlist_pooled(im, cap, lens, 2)[1], shortlist_pooled(im, poisoned, lens, 2)[1])


@pytest.mark.parametrize("kw, msg", [(dict(shortlist=0), r"shortlist must lie in 1\.\.3"),
                                     (dict(shortlist=4), r"shortlist must lie in 1\.\.3"),
                                     (dict(shortlist=2, k=3), r"k must lie in 1\.\.2"),
                                     (dict(method="dense"), "method must be one of")])
def test_bad_args(kw, msg):
    im, cap, lens = make(3, 5, 4, 5, 8, 0, False)
    with pytest.raises(ValueError, match=msg):
        two_stage(Head(), im, cap, lens, **({"shortlist": 3, "k": 1} | kw))
