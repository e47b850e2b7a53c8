"""ContrastiveLoss: a slow loop restatement of the official loss under hypothesis, the official vectorised
expression, hand-computed cases, gradients and input checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from itm_models.losses import ContrastiveLoss, contrastive_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def slow_loss(s: np.ndarray, margin: float, max_violation: bool) -> float:
    """The definition, one term at a time, in float64."""
    b = s.shape[0]
    cost_s = np.zeros((b, b))
    cost_im = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            if i != j:
                cost_s[i, j] = max(0.0, margin + s[i, j] - s[i, i])
                cost_im[i, j] = max(0.0, margin + s[i, j] - s[j, j])
    if max_violation:
        return float(sum(cost_s[i].max() for i in range(b)) + sum(cost_im[:, j].max() for j in range(b)))
    return float(cost_s.sum() + cost_im.sum())


def official_expression(scores: torch.Tensor, margin: float, max_violation: bool) -> torch.Tensor:
    """The official ContrastiveLoss.forward, restated with its expand_as / masked_fill_ steps."""
    diagonal = scores.diag().view(scores.size(0), 1)
    d1 = diagonal.expand_as(scores)
    d2 = diagonal.t().expand_as(scores)
    cost_s = (margin + scores - d1).clamp(min=0)
    cost_im = (margin + scores - d2).clamp(min=0)
    mask = torch.eye(scores.size(0)) > 0.5
    cost_s = cost_s.masked_fill_(mask, 0)
    cost_im = cost_im.masked_fill_(mask, 0)
    if max_violation:
        cost_s = cost_s.max(1)[0]
        cost_im = cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


@given(b=st.integers(1, 12), margin=st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0, -0.1]),
       max_violation=st.booleans(), seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_matches_slow_loop(b, margin, max_violation, seed, ties):
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1, 1, size=(b, b))
    if ties:  # a coarse grid makes equal scores and exact hinge kinks
        s = np.round(s * 4) / 4
    got = contrastive_loss(torch.from_numpy(s), margin, max_violation)
    want = slow_loss(s, margin, max_violation)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert abs(got.item() - want) <= 1e-12 * max(1.0, abs(want)), (got.item(), want)
    official = official_expression(torch.from_numpy(s), margin, max_violation)
    assert torch.equal(got, official), (got.item(), official.item())
    mod = ContrastiveLoss(margin=margin, max_violation=max_violation)
    assert torch.equal(mod(torch.from_numpy(s)), got)


def test_hand_computed():
    s = torch.tensor([[0.9, 0.8], [0.1, 0.5]], dtype=torch.float64)
    # cost_s: [0.2 + 0.8 - 0.9]+ = 0.1 (row 0), [0.2 + 0.1 - 0.5]+ = 0 (row 1)
    # cost_im: [0.2 + 0.1 - 0.9]+ = 0 (column 0), [0.2 + 0.8 - 0.5]+ = 0.5 (column 1)
    assert contrastive_loss(s, 0.2, True).item() == pytest.approx(0.6, abs=1e-15)
    assert contrastive_loss(s, 0.2, False).item() == pytest.approx(0.6, abs=1e-15)
    s3 = torch.tensor([[1.0, 0.9, 0.95], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    # row 0 negatives: 0.1 and 0.15 -> hardest 0.15, sum 0.25; column 0: image 0 beats nothing (all < 1 - 0.2)
    # column 1: [0.2 + 0.9 - 1]+ = 0.1 (image 0); column 2: [0.2 + 0.95 - 1]+ = 0.15
    assert contrastive_loss(s3, 0.2, True).item() == pytest.approx(0.15 + 0.1 + 0.15, abs=1e-12)
    assert contrastive_loss(s3, 0.2, False).item() == pytest.approx(0.25 + 0.1 + 0.15, abs=1e-12)


def test_single_pair_and_dtype():
    assert contrastive_loss(torch.tensor([[0.3]]), 0.2).item() == 0.0
    s = torch.rand(5, 5, dtype=torch.float32)
    assert contrastive_loss(s).dtype == torch.float32


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    s = torch.rand(6, 6, dtype=torch.float64, requires_grad=True)
    for mv in (True, False):
        assert torch.autograd.gradcheck(lambda x: contrastive_loss(x, 0.2, mv), (s,))
    # hardest negatives: exactly one negative per row and per column gets gradient
    s2 = torch.rand(6, 6, dtype=torch.float64, requires_grad=True)
    contrastive_loss(s2 * 0.01, 0.2, True).backward()
    off = s2.grad.clone().fill_diagonal_(0)
    assert int((off != 0).sum()) <= 12


@pytest.mark.parametrize("bad, match", [
    (torch.rand(3, 4), r"square \(B, B\).*\(3, 4\)"),
    (torch.rand(3), r"square \(B, B\).*\(3,\)"),
    (torch.rand(2, 3, 3), r"square"),
    (torch.ones(3, 3, dtype=torch.long), r"floating point"),
    (torch.empty(0, 0), r"empty"),
])
def test_bad_scores(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ContrastiveLoss()(bad)


def test_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        ContrastiveLoss(margin=float("nan"))
    with pytest.raises(ValueError, match="margin"):
        contrastive_loss(torch.rand(2, 2), margin="0.2")
    with pytest.raises(TypeError, match="torch.Tensor"):
        contrastive_loss(np.eye(3))
