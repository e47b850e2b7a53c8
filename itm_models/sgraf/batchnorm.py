"""SAF's BatchNorm1d(1) in training: per-caption batch statistics (the official loop calls BatchNorm once per
caption) and the closed-form running-statistics update of those consecutive calls."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["saf_batch_norm_train", "update_running_stats"]


def saf_batch_norm_train(bn: nn.BatchNorm1d, z: Tensor, node_valid: Tensor, train_stats: list) -> Tensor:
    """SAF's BatchNorm1d(1) in training mode on the gate logits ``z`` (P, n) of a block laid out (Ni, Nc)
    image-major (``train_stats[-1]`` = (Ni, Nc), set by the caller): each caption normalised with the statistics of
    its Ni x (L + 1) valid nodes, as the official loop's one BatchNorm call per caption; ``train_stats[-1]`` is
    replaced by the per-caption (mean, unbiased variance) for :func:`update_running_stats`."""
    n_img, n_cap = train_stats[-1]                                      # the block's layout, set by the caller
    z3 = z.view(n_img, n_cap, -1)
    v = node_valid.view(n_img, n_cap, -1).to(z.dtype)
    count = v.sum((0, 2))                                                # (Nc,)
    mean = (z3 * v).sum((0, 2)) / count
    centred = (z3 - mean[None, :, None]) * v
    var = centred.pow(2).sum((0, 2)) / count
    z3 = (z3 - mean[None, :, None]) / torch.sqrt(var[None, :, None] + bn.eps) * bn.weight + bn.bias
    train_stats[-1] = (mean.detach(), (var * count / (count - 1)).detach())
    return z3.reshape(z.shape)


@torch.no_grad()
def update_running_stats(bn: nn.BatchNorm1d, means: Tensor, unbiased_vars: Tensor) -> None:
    """The running-statistics updates of len(means) consecutive BatchNorm calls, in closed form."""
    n = means.shape[0]
    tracked = int(bn.num_batches_tracked)
    if bn.momentum is None:                                              # cumulative average
        bn.running_mean.mul_(tracked).add_(means.sum().to(bn.running_mean.dtype)).div_(tracked + n)
        bn.running_var.mul_(tracked).add_(unbiased_vars.sum().to(bn.running_var.dtype)).div_(tracked + n)
    else:
        m = bn.momentum
        decay = (1 - m) ** torch.arange(n - 1, -1, -1, dtype=torch.float64, device=means.device)
        bn.running_mean.mul_((1 - m) ** n).add_((m * decay * means.double()).sum().to(bn.running_mean.dtype))
        bn.running_var.mul_((1 - m) ** n).add_((m * decay * unbiased_vars.double()).sum()
                                               .to(bn.running_var.dtype))
    bn.num_batches_tracked.add_(n)
