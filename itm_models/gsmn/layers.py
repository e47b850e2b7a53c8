"""GSMN's layers under the official names: the weight-normalised Linear of the node MLPs (per output row, unlike
SCAN's one-gain :class:`itm_models.encoders.WeightNormLinear`), the visual (box geometry) and textual (word
affinity) graph convolutions and the two graph heads; helpers shared by the head's visual and textual parts."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import N_KERNELS
from .geometry import gaussian_kernel_weights, pseudo_coordinates

__all__ = ["WeightNormLinear", "VisualGraphConvolution", "TextualGraphConvolution", "VisualGraph", "TextualGraph"]


class WeightNormLinear(nn.Module):
    """``nn.utils.weight_norm(nn.Linear(n_in, n_out))`` with the official keys ``weight_g`` (n_out, 1),
    ``weight_v`` (n_out, n_in), ``bias``: weight = g v / |v| per output row."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        base = nn.Linear(n_in, n_out)
        self.weight_v = nn.Parameter(base.weight.detach().clone())
        self.weight_g = nn.Parameter(base.weight.detach().norm(dim=1, keepdim=True))
        self.bias = nn.Parameter(base.bias.detach().clone())

    def weight(self) -> Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight().to(x.dtype), self.bias.to(x.dtype))


class VisualGraphConvolution(nn.Module):
    """Gaussian-kernel graph convolution over box geometry (official ``ImageQueryGraphConvolution``)."""

    def __init__(self, feat_dim: int, hid_dim: int, n_kernels: int = N_KERNELS):
        super().__init__()
        self.conv_weights = nn.ModuleList(nn.Linear(feat_dim, hid_dim // n_kernels, bias=False)
                                          for _ in range(n_kernels))
        self.mean_rho = nn.Parameter(torch.empty(n_kernels, 1).uniform_(0.0, 1.0))
        self.mean_theta = nn.Parameter(torch.empty(n_kernels, 1).uniform_(-math.pi, math.pi))
        self.precision_rho = nn.Parameter(torch.empty(n_kernels, 1).uniform_(0.0, 1.0))
        self.precision_theta = nn.Parameter(torch.empty(n_kernels, 1).uniform_(0.0, 1.0))

    def kernel_weights(self, boxes: Tensor) -> Tensor:
        """Normalised boxes (N_img, K, 4) -> w_k(r, j) (N_img, K, K, n_kernels), in the boxes' dtype."""
        rho, theta = pseudo_coordinates(boxes)
        p = [t.to(boxes.dtype) for t in (self.mean_rho, self.mean_theta, self.precision_rho, self.precision_theta)]
        return gaussian_kernel_weights(rho, theta, *p)


class TextualGraphConvolution(nn.Module):
    """Word-affinity graph convolution (official ``TextQueryGraphConvolution``; its Linear layers have biases)."""

    def __init__(self, feat_dim: int, hid_dim: int, n_kernels: int = N_KERNELS):
        super().__init__()
        self.conv_weights = nn.ModuleList(nn.Linear(feat_dim, hid_dim // n_kernels, bias=True)
                                          for _ in range(n_kernels))
        self.params = nn.Parameter(torch.empty(n_kernels, 1).uniform_(-1.0, 1.0))


class VisualGraph(nn.Module):
    """The visual graph head (official ``i2t_match_G``): ``graph_convolution_1``, ``out_1``, ``out_2``."""

    def __init__(self, feat_dim: int = 16, hid_dim: int = 32, out_dim: int = 1, n_kernels: int = N_KERNELS):
        super().__init__()
        self.graph_convolution_1 = VisualGraphConvolution(feat_dim, hid_dim, n_kernels)
        self.out_1 = WeightNormLinear(hid_dim, hid_dim)
        self.out_2 = WeightNormLinear(hid_dim, out_dim)


class TextualGraph(nn.Module):
    """The textual graph head (official ``t2i_match_G``): ``graph_convolution_3``, ``out_1``, ``out_2``."""

    def __init__(self, feat_dim: int = 16, hid_dim: int = 32, out_dim: int = 1, n_kernels: int = N_KERNELS):
        super().__init__()
        self.graph_convolution_3 = TextualGraphConvolution(feat_dim, hid_dim, n_kernels)
        self.out_1 = WeightNormLinear(hid_dim, hid_dim)
        self.out_2 = WeightNormLinear(hid_dim, out_dim)


def _stacked(convs: nn.ModuleList, dtype) -> tuple[Tensor, Tensor | None]:
    """The n_kernels Linear(f -> o) as one (n_kernels, o, f) weight and (n_kernels, o) bias (or None)."""
    w = torch.stack([c.weight for c in convs]).to(dtype)
    b = torch.stack([c.bias for c in convs]).to(dtype) if convs[0].bias is not None else None
    return w, b


def _node_scores(head: nn.Module, h: Tensor) -> Tensor:
    """Per-node MLP out_2(tanh(out_1(h))): (..., hid) -> (...)."""
    return head.out_2(torch.tanh(head.out_1(h))).squeeze(-1)
