"""The "cpu" backend of ``node_match``: the fused C++ kernel ``torch.ops.itm_kernels.node_match_fused_``
(csrc/node_match/cpu.cpp; the algorithm is described in ``itm_kernels.node_match``)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._common import dispatch
from .._common.dtypes import out_dtype as _out_dtype
from .torch import DEFAULT_TILE_BYTES

# The C++ epilogue is compiled for GSMN's 16 blocks (one AVX-512 vector of float32); other counts run on "torch".
CPU_NUM_BLOCKS = 16


def _have_cpu_kernel() -> bool:
    return dispatch.has_cpu_op("node_match")


def _blocked(x: Tensor, num_blocks: int, rows: int) -> Tensor:
    """(n, len, d) -> (n, rows, d / num_blocks, num_blocks): feature b * db + e at [.., e, b], zero rows appended
    up to ``rows``."""
    n, length, d = x.shape
    out = x.new_zeros(n, rows, d // num_blocks, num_blocks)
    out[:, :length] = x.view(n, length, num_blocks, d // num_blocks).transpose(2, 3)
    return out


def node_match_cpu(images: Tensor, captions: Tensor, cap_lens: Tensor, *, lambda_softmax: float, num_blocks: int,
                   max_tile_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Forward with the fused C++ kernel (``torch.ops.itm_kernels.node_match_fused_``); validated CPU inputs, no
    autograd. Per call, the images' block-interleaved copy, Gram matrices and block norms; per caption range (length
    sorted, at most ``max_tile_bytes`` of block-interleaved words), the same for the captions; the kernel then scores
    every (image, caption) pair of the range in cache."""
    max_tile_bytes = max_tile_bytes or 2 * DEFAULT_TILE_BYTES
    n_img, K, d = images.shape
    n_cap, L = captions.shape[:2]
    B = num_blocks
    cdtype = _out_dtype(images.dtype)
    v = images.to(cdtype)
    img_blk = _blocked(v, B, -(-K // 4) * 4)                                                 # (N_img, Kp, db, B)
    vb = v.view(n_img, K, B, d // B)
    img_gram = torch.einsum("ikbe,ijbe->ikjb", vb, vb).contiguous()                         # (N_img, K, K, B)
    img_sq = vb.square().sum(3).contiguous()                                                 # (N_img, K, B)
    region = torch.empty(n_img, n_cap, K, B, dtype=cdtype, device=images.device)
    word = torch.empty(n_img, n_cap, L, B, dtype=cdtype, device=images.device)
    lens = cap_lens.tolist()
    order = sorted(range(n_cap), key=lens.__getitem__)
    order_t = torch.tensor(order, dtype=torch.long, device=images.device)
    per_word = d * (torch.finfo(cdtype).bits // 8)
    j0 = 0
    while j0 < n_cap:
        Lt = lens[order[j0]]
        j1 = j0 + 1
        while j1 < n_cap and (j1 - j0 + 1) * max(Lt, lens[order[j1]]) * per_word <= max_tile_bytes:
            Lt = max(Lt, lens[order[j1]])
            j1 += 1
        idx = order_t[j0:j1]
        e = captions[idx, :Lt].to(cdtype)
        valid = torch.arange(Lt, device=e.device)[None, :] < cap_lens[idx][:, None]
        e = torch.where(valid[..., None], e, 0.0)
        eb = e.view(j1 - j0, Lt, B, d // B)
        cap_gram = torch.einsum("ctbe,cube->ctub", eb, eb).contiguous()                      # (nc, Lt, Lt, B)
        torch.ops.itm_kernels.node_match_fused_(region, word, img_blk, _blocked(e, B, -(-Lt // 4) * 4), img_gram,
                                                img_sq, cap_gram, eb.square().sum(3).contiguous(),
                                                cap_lens[idx].contiguous(), idx, lambda_softmax)
        j0 = j1
    return region, word
