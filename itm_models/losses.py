"""The hinge-based triplet ranking loss of VSE++ / SCAN / SGRAF / GSMN (official ``ContrastiveLoss``).

For a batch score matrix S (B x B; row i = image i, column j = caption j, diagonal = positive pairs):

    cost_s[i, j]  = [margin + S_ij - S_ii]+   (caption j as a negative for image i)
    cost_im[i, j] = [margin + S_ij - S_jj]+   (image i as a negative for caption j)

with both diagonals zeroed. With ``max_violation`` (VSE++ hardest negatives) only the maximum of each row of
``cost_s`` and of each column of ``cost_im`` is kept. The loss is the SUM of all the terms (not the mean), as in the
official code, so its scale grows with the batch size.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ContrastiveLoss", "contrastive_loss"]


def _check_margin(margin) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    return float(margin)


def contrastive_loss(scores: torch.Tensor, margin: float = 0.2, max_violation: bool = True) -> torch.Tensor:
    """Hinge triplet loss of a square batch score matrix.

    Args:
        scores: (B, B) floating scores, row i = image i, column j = caption j, diagonal = positive pairs.
        margin: hinge margin (0.2 in every official configuration).
        max_violation: keep only the hardest negative per row (cost_s) and per column (cost_im).

    Returns:
        0-dim tensor of ``scores.dtype``: the sum of all hinge terms (0 for B = 1).
    """
    margin = _check_margin(margin)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor of shape (B, B), got {type(scores).__name__}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be floating point, got dtype {scores.dtype}")
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square (B, B) matrix of a batch of B positive pairs, got shape "
                         f"{tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("scores is empty (B = 0)")
    diagonal = scores.diagonal().unsqueeze(1)  # (B, 1): S_ii
    cost_s = (margin + scores - diagonal).clamp(min=0)  # compares row i with its own positive S_ii
    cost_im = (margin + scores - diagonal.t()).clamp(min=0)  # compares column j with its own positive S_jj
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_s = cost_s.masked_fill(eye, 0)
    cost_im = cost_im.masked_fill(eye, 0)
    if max_violation:
        cost_s = cost_s.max(dim=1).values
        cost_im = cost_im.max(dim=0).values
    return cost_s.sum() + cost_im.sum()


class ContrastiveLoss(nn.Module):
    """Module form of :func:`contrastive_loss` (official ``ContrastiveLoss(opt, margin, max_violation)``).

    Args:
        margin: hinge margin.
        max_violation: hardest negatives only (every official README training command uses it).
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True):
        super().__init__()
        self.margin = _check_margin(margin)
        self.max_violation = bool(max_violation)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, B) scores -> 0-dim summed hinge loss (see :func:`contrastive_loss`)."""
        return contrastive_loss(scores, self.margin, self.max_violation)

    def extra_repr(self) -> str:
        """``margin=..., max_violation=...`` for ``repr``."""
        return f"margin={self.margin}, max_violation={self.max_violation}"
