"""SCAN's image and text encoders (reused by SGRAF and GSMN), with the official parameter names.

Semantics (``shared/reference/SEMANTICS.md``, "Encoders"):

- Image: ``Linear(img_dim -> d)`` with a Xavier-uniform weight (uniform on +-sqrt(6)/sqrt(in + out)) and a zero
  bias, then :func:`l2norm` per region unless ``no_imgnorm``. The ``weight_norm`` variant reparametrises the weight
  as ``g * v / |v|_F`` with ONE scalar ``g`` (``weight_norm(dim=None)``); its keys are ``fc.weight_g``,
  ``fc.weight_v``, ``fc.bias``.
- Text: ``Embedding(V, word_dim)`` initialised U(-0.1, 0.1), a ``GRU(word_dim -> d, num_layers, batch_first)`` run
  on packed sequences; with ``bi_gru`` the two direction halves are AVERAGED (``(fwd + bwd) / 2``), then
  :func:`l2norm` per word unless ``no_txtnorm``. Positions beyond a caption's length are exact zeros.

Module attribute names (``fc``, ``embed``, ``rnn``) make the official state_dicts load as they are. The construction
order matches the official ``SCAN.__init__``, so under the same ``torch.manual_seed`` the initial weights are the
official ones bit for bit.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itm_kernels._common.constants import EPS

__all__ = ["l2norm", "EncoderImagePrecomp", "EncoderImageWeightNormPrecomp", "WeightNormLinear", "EncoderText",
           "build_image_encoder", "IMAGE_ENCODER_TYPES"]

IMAGE_ENCODER_TYPES = ("basic", "weight_norm")


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """Official ``l2norm``: ``x / (sqrt(sum x^2) + eps)`` along ``dim`` (eps added to the norm, no clamp).

    A zero vector stays zero. Shape and dtype are those of ``x``.
    """
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def _check_features(features, img_dim: int) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"image features must be a torch.Tensor of shape (N, regions, {img_dim}), "
                        f"got {type(features).__name__}")
    if not features.dtype.is_floating_point:
        raise TypeError(f"image features must be floating point, got dtype {features.dtype}")
    if features.dim() != 3:
        raise ValueError(f"image features must have shape (N, regions, {img_dim}), got {tuple(features.shape)}")
    if features.shape[2] != img_dim:
        raise ValueError(f"image features have width {features.shape[2]} (shape {tuple(features.shape)}), but the "
                         f"image encoder expects img_dim={img_dim}")
    return features


class EncoderImagePrecomp(nn.Module):
    """Official ``EncoderImagePrecomp``: Linear(img_dim -> embed_size) + per-region l2norm.

    Args:
        img_dim: input feature width (2048 for bottom-up-attention features).
        embed_size: joint embedding size d.
        no_imgnorm: skip the l2 normalisation.
    """

    def __init__(self, img_dim: int, embed_size: int, no_imgnorm: bool = False):
        super().__init__()
        self.img_dim = int(img_dim)
        self.embed_size = int(embed_size)
        self.no_imgnorm = bool(no_imgnorm)
        self.fc = nn.Linear(self.img_dim, self.embed_size)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier-uniform weight (r = sqrt(6) / sqrt(in + out)), zero bias, as the official ``init_weights``."""
        r = math.sqrt(6.0) / math.sqrt(self.fc.in_features + self.fc.out_features)
        with torch.no_grad():
            self.fc.weight.uniform_(-r, r)
            self.fc.bias.fill_(0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, K, img_dim) region features -> (N, K, embed_size) region embeddings (unit norm per region)."""
        features = self.fc(_check_features(images, self.img_dim))
        return features if self.no_imgnorm else l2norm(features, dim=-1)


class WeightNormLinear(nn.Module):
    """``Linear`` with ``weight = weight_g * weight_v / |weight_v|_F`` (``torch.nn.utils.weight_norm(dim=None)``).

    Parameters: ``weight_g`` (scalar, shape ()), ``weight_v`` (out, in), ``bias`` (out,): the state_dict keys of the
    official ``weight_norm(nn.Linear(...), dim=None)``, without the deprecated hook machinery. Initialised as that
    call initialises: ``v`` and ``bias`` from ``nn.Linear``'s default init, ``g = |v|_F`` (so ``weight == v``).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        base = nn.Linear(in_features, out_features)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_v = nn.Parameter(base.weight.detach().clone())
        self.weight_g = nn.Parameter(base.weight.detach().norm())
        self.bias = nn.Parameter(base.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The effective (out, in) weight ``g * v / |v|_F``."""
        return self.weight_v * (self.weight_g / self.weight_v.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return nn.functional.linear(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Old PyTorch versions stored the dim=None gain with shape (1,) or (1, 1); accept any one-element gain.
        key = prefix + "weight_g"
        g = state_dict.get(key)
        if isinstance(g, torch.Tensor) and g.dim() > 0 and g.numel() == 1:
            state_dict[key] = g.reshape(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class EncoderImageWeightNormPrecomp(EncoderImagePrecomp):
    """Official ``EncoderImageWeightNormPrecomp``: weight-normalised Linear (one scalar gain) + per-region l2norm.

    Keys ``fc.weight_g`` (scalar), ``fc.weight_v`` (embed_size, img_dim), ``fc.bias`` (embed_size,). The official
    variant keeps PyTorch's default Linear initialisation (no Xavier step); so does this one.
    """

    def __init__(self, img_dim: int, embed_size: int, no_imgnorm: bool = False):
        nn.Module.__init__(self)
        self.img_dim = int(img_dim)
        self.embed_size = int(embed_size)
        self.no_imgnorm = bool(no_imgnorm)
        self.fc = WeightNormLinear(self.img_dim, self.embed_size)

    def init_weights(self) -> None:
        """No-op: the official weight-norm encoder has no custom initialisation."""


def build_image_encoder(img_dim: int, embed_size: int, precomp_enc_type: str = "basic",
                        no_imgnorm: bool = False) -> nn.Module:
    """Official ``EncoderImage`` factory: ``"basic"`` or ``"weight_norm"`` precomputed-feature encoder."""
    if precomp_enc_type == "basic":
        return EncoderImagePrecomp(img_dim, embed_size, no_imgnorm)
    if precomp_enc_type == "weight_norm":
        return EncoderImageWeightNormPrecomp(img_dim, embed_size, no_imgnorm)
    raise ValueError(f"precomp_enc_type must be one of {IMAGE_ENCODER_TYPES}, got {precomp_enc_type!r}")


def _check_captions(ids, lengths, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (ids, lengths); return ids and lengths as a CPU int64 tensor."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"caption ids must be a torch.Tensor of shape (N, L_max), got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"caption ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"caption ids must have shape (N, L_max), got {tuple(ids.shape)}")
    n, l_max = ids.shape
    if n == 0:
        raise ValueError("caption ids hold no captions (shape (0, L_max))")
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"caption lengths must hold integers, got dtype {lengths.dtype}")
        lens = lengths.detach().to("cpu", torch.long)
    else:
        lens = torch.as_tensor(lengths)
        if lens.dtype.is_floating_point or lens.dtype == torch.bool:
            raise TypeError(f"caption lengths must hold integers, got {lens.dtype}")
        lens = lens.to(torch.long)
    if lens.dim() != 1 or lens.shape[0] != n:
        raise ValueError(f"caption lengths must have shape ({n},) to match ids {tuple(ids.shape)}, "
                         f"got {tuple(lens.shape)}")
    if int(lens.min()) < 1:
        bad = (lens < 1).nonzero().flatten().tolist()
        raise ValueError(f"caption(s) {bad[:10]} have length {int(lens[bad[0]])}: every caption needs at least one "
                         "token (official captions hold at least <start> and <end>)")
    if int(lens.max()) > l_max:
        bad = (lens > l_max).nonzero().flatten().tolist()
        raise ValueError(f"caption(s) {bad[:10]} have length {int(lens[bad[0]])} > L_max={l_max} of the ids tensor")
    valid = torch.arange(l_max)[None, :] < lens[:, None]
    real = ids.detach().cpu()[valid]
    lo, hi = int(real.min()), int(real.max())
    if lo < 0 or hi >= vocab_size:
        bad_mask = ((ids.detach().cpu() < 0) | (ids.detach().cpu() >= vocab_size)) & valid
        row, col = bad_mask.nonzero()[0].tolist()
        raise ValueError(f"caption {row} position {col} has token id {int(ids[row, col])}, outside the vocabulary "
                         f"0..{vocab_size - 1} (vocab_size={vocab_size}); ids in range {lo}..{hi}")
    return ids, lens


class EncoderText(nn.Module):
    """Official ``EncoderText``: word embedding + (bi-)GRU over packed sequences + per-word l2norm.

    Args:
        vocab_size: rows of the embedding table (ids must lie in 0..vocab_size-1).
        word_dim: word embedding size (300).
        embed_size: GRU hidden size = joint embedding size d.
        num_layers: GRU layers.
        use_bi_gru: bidirectional GRU whose two halves are averaged.
        no_txtnorm: skip the l2 normalisation.
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1,
                 use_bi_gru: bool = False, no_txtnorm: bool = False):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.word_dim = int(word_dim)
        self.embed_size = int(embed_size)
        self.num_layers = int(num_layers)
        self.use_bi_gru = bool(use_bi_gru)
        self.no_txtnorm = bool(no_txtnorm)
        self.embed = nn.Embedding(self.vocab_size, self.word_dim)
        self.rnn = nn.GRU(self.word_dim, self.embed_size, self.num_layers, batch_first=True,
                          bidirectional=self.use_bi_gru)
        self.init_weights()

    def init_weights(self) -> None:
        """Embedding U(-0.1, 0.1), as the official ``init_weights``; the GRU keeps PyTorch's default init."""
        with torch.no_grad():
            self.embed.weight.uniform_(-0.1, 0.1)

    def forward(self, ids: torch.Tensor, lengths) -> torch.Tensor:
        """Encode right-padded captions.

        Args:
            ids: (N, L_max) integer token ids; only the first ``lengths[i]`` entries of row i are read (padding may
                hold anything). Any order of lengths: sorted internally and restored.
            lengths: (N,) integer lengths in 1..L_max (tensor on any device, list or array).

        Returns:
            (N, L_max, embed_size) word embeddings in the encoder's dtype, exact zeros beyond each length
            (as ``pad_packed_sequence``).
        """
        ids, lens = _check_captions(ids, lengths, self.vocab_size)
        l_max = ids.shape[1]
        valid = (torch.arange(l_max)[None, :] < lens[:, None]).to(ids.device)
        x = self.embed(torch.where(valid, ids, torch.zeros((), dtype=ids.dtype, device=ids.device)))
        # Already sorted (the official collate's order): the official call exactly; otherwise torch sorts and unsorts.
        is_sorted = bool((lens[:-1] >= lens[1:]).all())
        packed = pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=is_sorted)
        out, _ = self.rnn(packed)
        cap_emb, _ = pad_packed_sequence(out, batch_first=True, total_length=l_max)
        if self.use_bi_gru:
            half = cap_emb.shape[2] // 2
            cap_emb = (cap_emb[:, :, :half] + cap_emb[:, :, half:]) / 2
        return cap_emb if self.no_txtnorm else l2norm(cap_emb, dim=-1)
