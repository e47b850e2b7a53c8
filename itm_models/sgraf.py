"""SGRAF similarity head (Paranioar/SGRAF ``EncoderSimilarity``: SGR and SAF) with a fused all-pairs evaluation.

Semantics (``shared/reference/SEMANTICS.md``, SGRAF), for an image (regions v_1..v_K, K = 36) and a caption
(words e_1..e_L):

- Global vectors. Image: ``VisualSA``: l = tanh(BN36(W_l V)), g = tanh(BN_d(W_g mean_k v_k)) (Dropout 0.4 after
  each tanh in training), w = softmax_k(W_c (l_k * g)), img_glo = l2norm(sum_k w_k v_k); BN36 is BatchNorm1d(36)
  with the 36 region slots as channels. Caption: ``TextSA``, the same without BatchNorm over the caption's words.
- sim_glo = l2norm(W_glo (img_glo - cap_glo)^2 + b_glo); sim_loc_t = :func:`itm_kernels.local_sim.local_sim`
  (SCAN t2i attention, clipped_l2norm, lambda 9, l2-normalised attended vector, l2norm(W_loc (a^ - e)^2 + b_loc)).
  Nodes X = [sim_glo; sim_loc_1..L].
- SGR: ``sgr_step`` untied steps Q = X W_q^T + b_q, K = X W_k^T + b_k, A = softmax_rows(Q K^T),
  X = ReLU(W_g (A X) + b_g); sim_vec = X[0]. SAF: sigma = sigmoid(BatchNorm1d(1)(W_a X + b_a)), w = l1norm of
  sigma over the L + 1 nodes, sim_vec = l2norm(sum_n w_n X_n). Score = sigmoid(W_e sim_vec + b_e).
- l2norm(x) = x / (|x| + 1e-8), l1norm(x) = x / (sum |x| + 1e-8).

The module's parameter and buffer names are the official ``sim_enc`` ones, so an official state_dict loads as is.

Exact rewrites used by the fast paths (every one is an identity in exact arithmetic, so scores agree with the
official code to float32 rounding):

- Row-softmax shift invariance: Q_i . K_j = (Q_i W_k) . X_j + Q_i . b_k, and the last term does not depend on j, so
  the attention logits are Y X^T with Y = X (W_q^T W_k) + b_q W_k: one (s x s) product per step instead of two.
- Rows of A sum to 1, so W_g (A X) + b_g = A (X W_g^T) + b_g: with the previous rule, one (s x 2s) GEMM
  X [W_q^T W_k | W_g^T] per step gives both the logit queries and the values.
- The last SGR step is needed for the global node only (one row per pair instead of L + 1).
- W (x - y)^2 = W x^2 - 2 (W diag(x)) y + W y^2 for the global branch of a training batch (``forward``): per image
  a (s, d) matrix times the caption globals, one GEMM without any per-pair d-sized temporary to keep for backward.
  ``sims`` uses the official per-pair form instead (the block's (pairs, d) squared differences and one GEMM): no
  cancellation, and no (images, s, d) product rebuilt for every caption chunk.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from itm_kernels._validation import FLOAT_DTYPES, check_features, check_lengths
from itm_kernels.fast_mm import brgemm_available, mm_float_out
from itm_kernels.local_sim import local_sim, local_sim_cpu, local_sim_gram

from .checkpoints import register_model_type
from .opt_fields import opt_fields

EPS = 1e-8
DROPOUT = 0.4
NUM_REGIONS = 36
LAMBDA_SOFTMAX = 9.0
MODULES = ("SGR", "SAF")
# Rows of graph nodes (pairs x (L + 1)) scored at a time by ``sims``; see its docstring for the memory.
DEFAULT_BLOCK_ROWS = 8192
# bfloat16/float16: graph sizes L + 1 are rounded up to a multiple of this, so that the block shapes (and oneDNN's
# per-shape state) come from a small fixed set.
NODE_BUCKET_LOW_PRECISION = 4
# Items whose global vectors are computed at a time (in eval mode each item's global vector is its own).
GLOBAL_CHUNK = 64
# The official README's (num_epochs, lr_update) per dataset and module; everything else in the recipe is shared.
RECIPE_SCHEDULES = {("f30k", "SGR"): (40, 30), ("f30k", "SAF"): (30, 20),
                    ("coco", "SGR"): (20, 10), ("coco", "SAF"): (20, 10)}

__all__ = ["SGRAFSimilarity", "VisualSA", "TextSA", "official_style_forward", "official_style_sims",
           "SGRAFTextEncoder", "SGRAF", "SGRAFConfig", "SGRAFEnsemble", "build_sgraf_from_official",
           "recipe_schedule", "RECIPE_SCHEDULES"]


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + EPS)


def _xavier_(linear: nn.Linear) -> None:
    """The official initialisation of every SGRAF Linear: U(-r, r), r = sqrt(6 / (in + out)), zero bias."""
    r = math.sqrt(6.0) / math.sqrt(linear.in_features + linear.out_features)
    linear.weight.data.uniform_(-r, r)
    linear.bias.data.fill_(0)


def _init_children(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            _xavier_(m)
        elif isinstance(m, nn.BatchNorm1d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


def _lengths_mask(lengths: Tensor, size: int) -> Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class VisualSA(nn.Module):
    """Global image vector by self-attention over the regions: (n, K, d) -> (n, d). K must equal ``num_region``."""

    def __init__(self, embed_dim: int, dropout_rate: float = DROPOUT, num_region: int = NUM_REGIONS):
        super().__init__()
        self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.BatchNorm1d(num_region),
                                             nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.BatchNorm1d(embed_dim),
                                              nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        _init_children(self)

    def forward(self, local: Tensor) -> Tensor:
        l_emb = self.embedding_local(local)                                   # (n, K, d)
        g_emb = self.embedding_global(local.mean(1))                          # (n, d)
        weights = torch.softmax(self.embedding_common(l_emb * g_emb[:, None]).squeeze(2), dim=1)
        return l2norm((weights[:, :, None] * local).sum(1))


class TextSA(nn.Module):
    """Global caption vector by self-attention over the caption's words: (n, L, d), lengths (n,) -> (n, d)."""

    def __init__(self, embed_dim: int, dropout_rate: float = DROPOUT):
        super().__init__()
        self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        _init_children(self)

    def forward(self, local: Tensor, lengths: Tensor) -> Tensor:
        valid = _lengths_mask(lengths, local.shape[1])                        # (n, L)
        words = local[valid]                                                  # (W, d): real words only
        rows = torch.repeat_interleave(torch.arange(local.shape[0], device=local.device), lengths)
        mean = torch.zeros(local.shape[0], local.shape[2], dtype=local.dtype, device=local.device)
        mean = mean.index_add(0, rows, words) / lengths[:, None].to(local.dtype)
        l_emb = self.embedding_local(words)                                   # (W, d)
        g_emb = self.embedding_global(mean)                                   # (n, d)
        logits = self.embedding_common(l_emb * g_emb[rows]).squeeze(1)       # (W,)
        padded = torch.full(valid.shape, float("-inf"), dtype=logits.dtype, device=logits.device)
        weights = torch.softmax(padded.masked_scatter(valid, logits), dim=1)[valid]
        glo = torch.zeros_like(mean).index_add(0, rows, weights[:, None] * words)
        return l2norm(glo)


class GraphReasoning(nn.Module):
    """Parameters of one SGR step (official names); the computation lives in :class:`SGRAFSimilarity`."""

    def __init__(self, sim_dim: int):
        super().__init__()
        self.graph_query_w = nn.Linear(sim_dim, sim_dim)
        self.graph_key_w = nn.Linear(sim_dim, sim_dim)
        self.sim_graph_w = nn.Linear(sim_dim, sim_dim)
        _init_children(self)


class AttentionFiltration(nn.Module):
    """Parameters of SAF (official names): the gate Linear(s -> 1) and its BatchNorm1d(1)."""

    def __init__(self, sim_dim: int):
        super().__init__()
        self.attn_sim_w = nn.Linear(sim_dim, 1)
        self.bn = nn.BatchNorm1d(1)
        _init_children(self)


class SGRAFSimilarity(nn.Module):
    """The SGRAF similarity head ``sim_enc`` (SGR or SAF), loading the official state_dict as is.

    Args:
        embed_size: d (1024 in the paper). sim_dim: s (256). module: "SGR" or "SAF". sgr_step: SGR steps (3).

    Use :meth:`sims` for evaluation (all pairs, bounded memory, float32/float64/bfloat16) and :meth:`forward`
    for training on a batch (all B_img x B_cap pairs with autograd, dropout and BatchNorm batch statistics as the
    official ``forward_sim``).
    """

    def __init__(self, embed_size: int = 1024, sim_dim: int = 256, module: str = "SGR", sgr_step: int = 3):
        super().__init__()
        if module not in MODULES:
            raise ValueError(f"module must be one of {MODULES}, got {module!r}")
        if module == "SGR" and (not isinstance(sgr_step, int) or sgr_step < 1):
            raise ValueError(f"sgr_step must be a positive int, got {sgr_step!r}")
        self.module_name = module
        self.embed_size, self.sim_dim, self.sgr_step = embed_size, sim_dim, sgr_step
        # Same construction order as the official EncoderSimilarity, so a seeded build draws the same weights.
        self.v_global_w = VisualSA(embed_size, DROPOUT, NUM_REGIONS)
        self.t_global_w = TextSA(embed_size, DROPOUT)
        self.sim_tranloc_w = nn.Linear(embed_size, sim_dim)
        self.sim_tranglo_w = nn.Linear(embed_size, sim_dim)
        self.sim_eval_w = nn.Linear(sim_dim, 1)
        if module == "SGR":
            self.SGR_module = nn.ModuleList([GraphReasoning(sim_dim) for _ in range(sgr_step)])
        else:
            self.SAF_module = AttentionFiltration(sim_dim)
        for m in (self.sim_tranloc_w, self.sim_tranglo_w, self.sim_eval_w):
            _xavier_(m)

    # ---------------------------------------------------------------------------------------------------------
    # pieces shared by sims() and forward()
    # ---------------------------------------------------------------------------------------------------------

    def _check(self, img_emb: Tensor, cap_emb: Tensor, cap_lens) -> Tensor:
        """Named errors for malformed inputs; returns cap_lens as int64 on cap_emb's device."""
        check_features("img_emb", img_emb)
        check_features("cap_emb", cap_emb)
        if img_emb.shape[1] != NUM_REGIONS or img_emb.shape[2] != self.embed_size:
            raise ValueError(f"img_emb must be (N_img, {NUM_REGIONS}, {self.embed_size}), got {tuple(img_emb.shape)}")
        if cap_emb.shape[2] != self.embed_size:
            raise ValueError(f"cap_emb must be (N_cap, L_max, {self.embed_size}), got {tuple(cap_emb.shape)}")
        if img_emb.dtype != cap_emb.dtype:
            raise TypeError(f"img_emb and cap_emb must have the same dtype, got {img_emb.dtype} and {cap_emb.dtype}")
        if img_emb.device != cap_emb.device:
            raise ValueError(f"img_emb and cap_emb must be on the same device, got {img_emb.device} and "
                             f"{cap_emb.device}")
        return check_lengths("cap_lens", cap_lens, cap_emb.shape[0], cap_emb.shape[1], cap_emb.device)

    def _weights(self, dtype: torch.dtype, mm_dtype: torch.dtype) -> dict:
        """The head's weights in the compute dtype, plus per SGR step P = W_q^T W_k, c = b_q W_k and W_g^T.

        Differentiable (used by forward() too); for float32 the products are formed in float64 first when no
        gradient is needed, so that P carries no more rounding than the official Q K^T.
        """
        grad = torch.is_grad_enabled()
        cast = lambda t, dt=dtype: t.to(dt)  # noqa: E731
        w = dict(glo_w=cast(self.sim_tranglo_w.weight), glo_b=cast(self.sim_tranglo_w.bias),
                 eval_w=cast(self.sim_eval_w.weight), eval_b=cast(self.sim_eval_w.bias))
        if self.module_name == "SGR":
            steps = []
            for m in self.SGR_module:
                pdt = dtype if grad else torch.float64
                wq, wk = m.graph_query_w.weight.to(pdt), m.graph_key_w.weight.to(pdt)
                p, c = wq.t() @ wk, m.graph_query_w.bias.to(pdt) @ wk
                g_w_t = m.sim_graph_w.weight.to(pdt).t()
                step = dict(p=p.to(mm_dtype), c=c.to(mm_dtype), g_w_t=g_w_t.to(mm_dtype).contiguous(),
                            g_b=m.sim_graph_w.bias.to(mm_dtype))
                if not grad:                                                 # the fused step's operands
                    step.update(pg=torch.cat([p, g_w_t], dim=1).to(mm_dtype).contiguous(),
                                c_f32=c.float().contiguous(), g_b_f32=m.sim_graph_w.bias.float().contiguous())
                steps.append(step)
            w["steps"] = steps
        else:
            saf = self.SAF_module
            w.update(attn_w=cast(saf.attn_sim_w.weight), attn_b=cast(saf.attn_sim_w.bias))
            if not grad:                                                     # the fused saf_scores' operands
                bn = saf.bn
                scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
                shift = (saf.attn_sim_w.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
                w["saf_fused"] = (saf.attn_sim_w.weight.float().reshape(-1).contiguous(), float(scale), float(shift),
                                  self.sim_eval_w.weight.float().reshape(-1).contiguous(),
                                  float(self.sim_eval_w.bias))
        return w

    @staticmethod
    def _global_sims(img_glo: Tensor, cap_glo: Tensor, w: Tensor, b: Tensor, mm_dtype=None) -> Tensor:
        """l2norm(W (x_i - y_c)^2 + b) for every pair: (Ni, d), (Nc, d) -> (Ni, Nc, s), through
        W x^2 - 2 (W diag(x)) y + W y^2 (one GEMM, no (Ni, Nc, d) temporary); the cross GEMM in ``mm_dtype``."""
        mm_dtype = mm_dtype or img_glo.dtype
        sq_img = img_glo.pow(2) @ w.t()                                      # (Ni, s)
        sq_cap = cap_glo.pow(2) @ w.t()                                      # (Nc, s)
        scaled = (w[None] * img_glo[:, None, :]).to(mm_dtype)                # (Ni, s, d)
        cross = torch.matmul(scaled, cap_glo.t().to(mm_dtype)).to(img_glo.dtype)   # (Ni, s, Nc)
        y = sq_img[:, None, :] + sq_cap[None] - 2 * cross.transpose(1, 2) + b
        return l2norm(y)

    @staticmethod
    def _global_sims_block(img_glo: Tensor, cap_glo: Tensor, w_t: Tensor, b: Tensor, out: Tensor) -> None:
        """The global nodes of an evaluation block as the official code computes them, l2norm(W (x_i - y_c)^2
        + b), into ``out`` (Ni, Nc, s): the (Ni Nc, d) squared differences (a few MiB per block) and one GEMM with
        ``w_t`` = W^T (d, s) in its dtype (float32 accumulation; brgemm via ``mm_float_out`` for a float32 ``b``),
        bias and l2norm in float32/64."""
        ni, nc, d = img_glo.shape[0], cap_glo.shape[0], img_glo.shape[1]
        diff = torch.sub(img_glo[:, None, :], cap_glo[None, :, :]).square_().view(ni * nc, d).to(w_t.dtype)
        y = mm_float_out(diff, w_t) if b.dtype == torch.float32 else torch.mm(diff, w_t).to(b.dtype)
        out.copy_(l2norm(y.add_(b)).view(ni, nc, -1))

    @staticmethod
    def _sgr(x: Tensor, node_valid: Tensor, w: dict) -> Tensor:
        """SGR on nodes x (P, n, s) in the matmul dtype (node 0 global; invalid nodes are never read as keys or
        values) -> sim_vec (P, s) in the compute dtype. Matrix products in x's dtype, softmaxes in float32/64."""
        cdtype = w["eval_w"].dtype
        P, n, s = x.shape
        key_mask = ~node_valid[:, None, :]                                   # (P, 1, n)
        steps = w["steps"]
        fused = _fused_step_applies(x, steps[0])
        if fused:
            counts = node_valid.sum(1)
            for st in steps[:-1]:                                        # [Y | U] GEMM and the step, in place
                torch.ops.itm_kernels.sgr_step_(x, st["pg"], st["c_f32"], st["g_b_f32"], counts)
            steps = steps[-1:]
        for st in steps[:-1]:
            # [Y | U] = X [W_q^T W_k | W_g^T]; logits (Y + b_q W_k) X^T; X' = ReLU(A U + b_g) = ReLU(W_g (A X) + b_g)
            # because every row of A sums to 1.
            # The query bias c enters as the per-key term c . X_j (no broadcast copy of a bias into the GEMM).
            flat = x.view(P * n, s)
            # Y and U as two GEMMs with contiguous results: the batched products below read them without the
            # copies that the strided halves of one (P n, 2 s) product cost.
            y = torch.mm(flat, st["p"]).view(P, n, s)
            u = torch.mm(flat, st["g_w_t"]).view(P, n, s)
            key_term = torch.mv(flat, st["c"]).view(P, 1, n)
            logits = torch.baddbmm(key_term, y, x.transpose(1, 2)).to(cdtype)
            del y
            attn = torch.softmax(logits.masked_fill_(key_mask, float("-inf")), dim=-1).to(x.dtype)
            x = torch.baddbmm(st["g_b"], attn, u).relu_()                   # (P, n, s)
        st = steps[-1]                                                       # the global node only
        if fused:                 # float32 results (brgemm), z0 in float32 by the C++ kernel
            y0 = mm_float_out(x[:, 0], st["p"]).add_(st["c_f32"])            # (P, s)
            z0 = torch.ops.itm_kernels.sgr_global_attend(x, y0, counts).to(x.dtype)
            return mm_float_out(z0, st["g_w_t"]).add_(st["g_b_f32"]).relu_().to(cdtype)
        y0 = torch.addmm(st["c"], x[:, 0], st["p"])                          # (P, s)
        logits = torch.bmm(x, y0[:, :, None]).squeeze(2).to(cdtype)          # (P, n)
        attn = torch.softmax(logits.masked_fill(~node_valid, float("-inf")), dim=-1).to(x.dtype)
        z0 = torch.bmm(attn[:, None, :], x).squeeze(1)                       # (P, s)
        return torch.addmm(st["g_b"], z0, st["g_w_t"]).relu_().to(cdtype)

    def _saf(self, x: Tensor, node_valid: Tensor, w: dict, train_stats: list | None) -> Tensor:
        """SAF on nodes x (P, n, s) -> sim_vec (P, s), pairs laid out (Ni, Nc) image-major.

        With ``train_stats`` (a list; training mode), BatchNorm1d(1) normalises with the statistics of each caption
        over its Ni x (L + 1) nodes, as the official loop (one BatchNorm call per caption) does, and appends the
        per-caption (mean, unbiased variance) to ``train_stats`` for the running-statistics update.
        """
        bn = self.SAF_module.bn
        z = (x @ w["attn_w"].t()).squeeze(2) + w["attn_b"]                   # (P, n)
        if train_stats is not None:
            z = self._saf_batch_norm_train(z, node_valid, train_stats)
        else:
            scale = bn.weight.to(z.dtype) / torch.sqrt(bn.running_var.to(z.dtype) + bn.eps)
            z = (z - bn.running_mean.to(z.dtype)) * scale + bn.bias.to(z.dtype)
        sigma = torch.sigmoid(z) * node_valid.to(z.dtype)
        weights = sigma / (sigma.sum(1, keepdim=True) + EPS)
        return l2norm(torch.matmul(weights[:, None, :], x).squeeze(1))

    @staticmethod
    def _saf_scores_fused(x: Tensor, lens: Tensor, w: dict) -> Tensor:
        """Eval-mode SAF + score by the C++ kernel (``saf_scores``: one pass over each pair's valid nodes):
        x (P, n, s) float32 pairs laid out image-major over the captions of ``lens`` -> (P,) float32."""
        gate_w, scale, shift, eval_w, eval_b = w["saf_fused"]
        counts = (lens + 1).repeat(x.shape[0] // lens.shape[0])
        return torch.ops.itm_kernels.saf_scores(x, counts, gate_w, scale, shift, eval_w, eval_b)

    def _saf_batch_norm_train(self, z: Tensor, node_valid: Tensor, train_stats: list) -> Tensor:
        bn = self.SAF_module.bn
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

    @staticmethod
    @torch.no_grad()
    def _update_running_stats(bn: nn.BatchNorm1d, means: Tensor, unbiased_vars: Tensor) -> None:
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

    def _score_block(self, sim_glo: Tensor, sim_loc: Tensor, lens: Tensor, w: dict, mm_dtype: torch.dtype,
                     train_stats: list | None = None, n_nodes: int | None = None) -> Tensor:
        """Scores of a block: sim_glo (Ni, Nc, s), sim_loc (Ni, Nc, Lc, s), lens (Nc,) -> (Ni, Nc). The node
        tensor has ``n_nodes`` >= Lc + 1 nodes per pair (extra ones are zero and never read as keys)."""
        ni, nc, lc, s = sim_loc.shape
        n_nodes = n_nodes or lc + 1
        x_dtype = mm_dtype if self.module_name == "SGR" else sim_glo.dtype
        if torch.is_grad_enabled():
            x = torch.cat([sim_glo[:, :, None], sim_loc.to(sim_glo.dtype)], dim=2).to(x_dtype)
            if n_nodes > lc + 1:
                x = torch.nn.functional.pad(x, (0, 0, 0, n_nodes - lc - 1))
        else:                                                                # cast while concatenating
            x = torch.empty(ni, nc, n_nodes, s, dtype=x_dtype, device=sim_loc.device)
            torch.cat([sim_glo[:, :, None], sim_loc.to(sim_glo.dtype)], dim=2, out=x[:, :, : lc + 1])
            x[:, :, lc + 1:] = 0
        del sim_loc                                                          # the caller holds no reference
        return self._score_nodes(x, lens, w, train_stats)

    def _score_nodes(self, x: Tensor, lens: Tensor, w: dict, train_stats: list | None = None) -> Tensor:
        """Scores of a block from its node tensor x (Ni, Nc, n_nodes, s): node 0 global, nodes 1..L_c the words,
        the rest zero (never read as keys) -> (Ni, Nc)."""
        ni, nc, n_nodes, s = x.shape
        x = x.view(ni * nc, n_nodes, s)
        if self.module_name == "SAF" and train_stats is None and "saf_fused" in w and _fused_saf_applies(x):
            return self._saf_scores_fused(x, lens, w).view(ni, nc)
        node_valid = (torch.arange(n_nodes, device=lens.device)[None, :] <= lens[:, None])    # (Nc, n)
        node_valid = node_valid[None].expand(ni, nc, n_nodes).reshape(ni * nc, n_nodes)
        if self.module_name == "SGR":
            vec = self._sgr(x, node_valid, w)
        else:
            if train_stats is not None:
                train_stats.append((ni, nc))
            vec = self._saf(x, node_valid, w, train_stats)
        return torch.sigmoid(vec @ w["eval_w"].t() + w["eval_b"]).view(ni, nc)

    # ---------------------------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sims(self, img_emb: Tensor, cap_emb: Tensor, cap_lens, *, dtype: torch.dtype | None = None,
             block_rows: int = DEFAULT_BLOCK_ROWS, max_tile_bytes: int | None = None) -> Tensor:
        """All-pairs SGRAF scores with inference semantics (running BatchNorm statistics, no dropout), whatever
        ``self.training`` is.

        Args:
            img_emb: (N_img, 36, d) region embeddings. cap_emb: (N_cap, L_max, d) word embeddings, right-padded
                (padding never read). cap_lens: (N_cap,) lengths in 1..L_max.
            dtype: dtype of the matrix products (default: img_emb's): float32 (the official evaluation's),
                float64, or bfloat16/float16 (autocast-style: the per-pair matrix products, W_glo's included, in
                that dtype with float32 accumulation; the global vectors, the squared differences, softmaxes,
                normalisations, the SAF gate and the score in float32).
            block_rows: graph nodes (pairs x (L + 1)) per block. max_tile_bytes: local_sim's scratch cap.
        Returns:
            (N_img, N_cap) scores, float64 for float64, float32 otherwise.

        Work: the global vectors once per image and once per caption; captions grouped by length (by exact
        length in float32/float64: no padding; by L + 1 rounded up to a multiple of 4 in bfloat16/float16, which
        bounds the number of distinct GEMM shapes and so oneDNN's per-shape memory) and cut into chunks; per
        block of (images x caption chunk) pairs, one node tensor written in place: the global nodes as one GEMM
        over the block's squared differences, the word nodes by :func:`itm_kernels.local_sim.local_sim_cpu` (the
        fused C++ kernel on CPU tensors, the chunked torch path elsewhere) straight into their rows (the per-image
        Gram matrices computed once), then SGR/SAF. On the CPU in float32/bfloat16 each SGR step but the last is
        one fused kernel per chunk of pairs (``sgr_step_``: the [Y | U] brgemm and the per-pair attention, in place)
        and the last step's global-node attention another (``sgr_global_attend``), and SAF's filtration and score
        one pass per pair (``saf_scores``, float32 nodes); elsewhere every per-pair dense layer is one torch GEMM
        over the block.

        Peak memory beyond inputs and output: a matmul-dtype copy of img_emb when ``dtype`` differs from its dtype
        (captions are cast one chunk at a time), the global vectors (N_img + N_cap) x d (computed 64 items at a
        time), the Gram matrices (N_img x 36 x 36), and per block the node tensor (block_rows x s values; the
        unfused torch SGR path keeps about 5 such tensors) + the block's squared global differences (pairs x d,
        2-16 MiB in float32) + per thread local_sim's scratch (``max_tile_bytes``, default 2 MiB) and the SGR
        kernel's [Y | U] tile (512 KiB): tens of MiB at the defaults (d = 1024, s = 256, block_rows = 8192) beyond
        the O(N_img + N_cap) items above (measured: benchmarks/bench_sgraf.py, bench_eval.py). In bfloat16, oneDNN
        also keeps about 0.3-0.5 MiB per distinct torch GEMM shape for the life of the process; the shape
        bucketing above bounds that for one evaluation.
        """
        lens = self._check(img_emb, cap_emb, cap_lens)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be None or one of {FLOAT_DTYPES}, got {dtype}")
        mm_dtype = dtype or img_emb.dtype
        cdtype = torch.float64 if mm_dtype == torch.float64 else torch.float32
        n_img, n_cap = img_emb.shape[0], cap_emb.shape[0]
        was_training = self.training
        self.eval()
        try:
            visual, textual = self._module_in(self.v_global_w, cdtype), self._module_in(self.t_global_w, cdtype)
            img_glo = torch.cat([visual(img_emb[i:i + GLOBAL_CHUNK].to(cdtype))
                                 for i in range(0, n_img, GLOBAL_CHUNK)])
            cap_glo = torch.cat([textual(cap_emb[i:i + GLOBAL_CHUNK].to(cdtype), lens[i:i + GLOBAL_CHUNK])
                                 for i in range(0, n_cap, GLOBAL_CHUNK)])
            w = self._weights(cdtype, mm_dtype)
            loc_w, loc_b = self.sim_tranloc_w.weight.to(cdtype), self.sim_tranloc_w.bias.to(cdtype)
            img_mm = img_emb.to(mm_dtype)                                   # captions: per chunk, below
            gram = local_sim_gram(img_mm, cdtype)                            # per image, once (not per block)
            out = torch.empty(n_img, n_cap, dtype=cdtype, device=img_emb.device)
            x_dtype = mm_dtype if self.module_name == "SGR" else cdtype
            glo_w_t, glo_b_mm = w["glo_w"].to(mm_dtype).t().contiguous(), w["glo_b"].to(cdtype)
            bucket = NODE_BUCKET_LOW_PRECISION if mm_dtype in (torch.bfloat16, torch.float16) else 1
            nodes_per_image = max(1, block_rows // min(n_img, 16))
            for idx, n_nodes, nominal in _pair_chunks(lens, nodes_per_image, bucket):
                lens_c = lens[idx]
                cap_c = cap_emb[idx, : int(lens_c.max())].to(mm_dtype)
                img_chunk = max(1, block_rows // (nominal * n_nodes))
                lc, cap_glo_c = cap_c.shape[1], cap_glo[idx]
                for i0 in range(0, n_img, img_chunk):
                    i1 = min(n_img, i0 + img_chunk)
                    # The block's node tensor is written in place: the global node by one GEMM, the word nodes
                    # by local_sim straight into their rows (cast once), the bucket's spare nodes zeroed.
                    x = torch.empty(i1 - i0, len(idx), n_nodes, self.sim_dim, dtype=x_dtype, device=out.device)
                    self._global_sims_block(img_glo[i0:i1], cap_glo_c, glo_w_t, glo_b_mm, out=x[:, :, 0])
                    local_sim_cpu(img_mm[i0:i1], cap_c, lens_c, loc_w, loc_b, lambda_softmax=LAMBDA_SOFTMAX,
                                  max_tile_bytes=max_tile_bytes, out=x[:, :, 1:lc + 1], gram=gram[i0:i1])
                    if n_nodes > lc + 1:
                        x[:, :, lc + 1:] = 0
                    out[i0:i1, idx] = self._score_nodes(x, lens_c, w)
        finally:
            self.train(was_training)
        return out

    def forward(self, img_emb: Tensor, cap_emb: Tensor, cap_lens) -> Tensor:
        """Scores of every (image, caption) pair of a batch, (B_img, B_cap), with autograd: the official
        ``forward_sim``. In training mode: dropout 0.4 in VisualSA/TextSA, BatchNorm batch statistics (VisualSA
        over the image batch; SAF per caption over its B_img x (L + 1) nodes, running statistics updated once per
        caption as the official loop does).

        Memory: captions are processed in length-sorted chunks, each padded to its own longest caption, so the
        activations kept for backward are about 8 x B_img x sum_c (L_c + 1) x s values (float32), plus what
        local_sim saves: its inputs only.
        """
        lens = self._check(img_emb, cap_emb, cap_lens)
        dtype = img_emb.dtype
        img_glo = self.v_global_w(img_emb)
        cap_glo = self.t_global_w(cap_emb, lens)
        w = self._weights(dtype, dtype)
        chunks = list(_caption_chunks(lens, max(int(lens.max()), 4096 // max(1, min(img_emb.shape[0], 16)))))
        glo_all = self._global_sims(img_glo, cap_glo, w["glo_w"], w["glo_b"])     # (B_img, B_cap, s)
        saf_train = self.module_name == "SAF" and self.training
        cols, stats = [], []
        for idx in chunks:
            lens_c = lens[idx]
            cap_c = cap_emb[idx, : int(lens_c.max())]
            loc = local_sim(img_emb, cap_c, lens_c, self.sim_tranloc_w.weight, self.sim_tranloc_w.bias,
                            lambda_softmax=LAMBDA_SOFTMAX)
            cols.append(self._score_block(glo_all[:, idx], loc, lens_c, w, dtype, stats if saf_train else None))
        order = torch.cat(chunks)
        inverse = torch.argsort(order)
        if saf_train and self.SAF_module.bn.track_running_stats:
            means = torch.cat([m for m, _ in stats])[inverse]                  # back to caption order
            variances = torch.cat([v for _, v in stats])[inverse]
            self._update_running_stats(self.SAF_module.bn, means, variances)
        return torch.cat(cols, dim=1)[:, inverse]

    @staticmethod
    def _module_in(module: nn.Module, dtype: torch.dtype):
        """Call ``module`` with its parameters cast to ``dtype`` (float64 evaluation) without touching them."""
        if next(module.parameters()).dtype == dtype:
            return module
        return lambda *args: torch.func.functional_call(
            module, {k: v.to(dtype) if v.is_floating_point() else v
                     for k, v in list(module.named_parameters()) + list(module.named_buffers())}, args)


def _fused_step_applies(x: Tensor, step: dict) -> bool:
    """Whether :meth:`SGRAFSimilarity._sgr` can run with the fused CPU kernels of csrc/cpu/sgr_cpu.cpp (``sgr_step_``
    for the steps before the last, ``sgr_global_attend`` for the last step's global node): inference (no autograd), a
    contiguous float32 or bfloat16 CPU node tensor with s a multiple of 64, the compiled extension loaded, and for
    bfloat16 a CPU whose brgemm reads VNNI-packed bfloat16 (AVX-512-BF16; elsewhere the torch path runs)."""
    return (not torch.is_grad_enabled() and "pg" in step and x.device.type == "cpu" and x.is_contiguous()
            and x.dtype in (torch.float32, torch.bfloat16) and x.shape[2] % 64 == 0 and _has_cpu_op("sgr_step_")
            and brgemm_available(x.dtype))


def _fused_saf_applies(x: Tensor) -> bool:
    """Whether the eval-mode SAF filtration and score can run as the fused CPU kernel ``saf_scores``
    (csrc/cpu/saf_cpu.cpp): no autograd, a contiguous float32 CPU node tensor with s a multiple of 16, and the
    compiled extension loaded (float64 evaluation keeps the torch path)."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and x.is_contiguous() and x.shape[-1] % 16 == 0 and _has_cpu_op("saf_scores"))


def _has_cpu_op(name: str) -> bool:
    """Whether the compiled extension is loaded and registers ``torch.ops.itm_kernels.<name>``."""
    from itm_kernels.backends import load_extension

    return load_extension() is not None and hasattr(torch.ops.itm_kernels, name)


def _pair_chunks(lens: Tensor, nodes_per_chunk: int, bucket: int):
    """Chunks of captions for :meth:`SGRAFSimilarity.sims`: yields (index tensor, n_nodes, nominal count).

    Captions are grouped by n_nodes = L + 1 rounded up to a multiple of ``bucket`` (longest group first) and each
    group is cut into chunks of ``nominal = nodes_per_chunk // n_nodes`` captions (the group's last chunk may be
    smaller). With bucket 1 no chunk has padding; with a bucket the block shapes come from a small fixed set,
    whatever the data size (see ``itm_kernels.local_sim.LOW_PRECISION_ROW_BUCKET`` for why that matters).
    """
    order = torch.argsort(lens.cpu(), descending=True, stable=True)
    nodes = ((lens.cpu()[order] + 1 + bucket - 1) // bucket) * bucket
    start = 0
    while start < len(order):
        n_nodes = int(nodes[start])
        stop = start + int((nodes[start:] == n_nodes).sum())
        nominal = max(1, nodes_per_chunk // n_nodes)
        for c0 in range(start, stop, nominal):
            yield order[c0:min(stop, c0 + nominal)].to(lens.device), n_nodes, nominal
        start = stop


def _caption_chunks(lens: Tensor, words_per_chunk: int):
    """Index tensors of captions sorted by decreasing length, each chunk with about ``words_per_chunk`` words."""
    from itm_kernels.torch_backend import caption_chunks

    for idx in caption_chunks(lens, words_per_chunk):
        yield idx.to(lens.device)


# ------------------------------------------------------------------------------------------------------------------
# The official evaluation loop, restated (benchmark baseline and test oracle)
# ------------------------------------------------------------------------------------------------------------------

def official_style_forward(head: SGRAFSimilarity, img_emb: Tensor, cap_emb: Tensor, cap_lens) -> Tensor:
    """The official ``EncoderSimilarity.forward`` restated step by step on ``head``'s modules: the image globals of
    the shard, then a Python loop over captions; each caption is repeated once per image, its attended vectors
    (n_img, L, d) are materialised, then W_loc, the global branch, the SGR steps with separate query/key layers on
    all nodes, or SAF with its BatchNorm called once per caption. Honours ``head.training`` as the official code
    does (dropout, batch statistics, running-statistics updates). Returns (n_img, n_cap).
    """
    n_img = img_emb.shape[0]
    lens = [int(x) for x in cap_lens]
    img_glo = head.v_global_w(img_emb)
    columns = []
    for c, n_word in enumerate(lens):
        cap_i = cap_emb[c:c + 1, :n_word]
        cap_rep = cap_i.repeat(n_img, 1, 1)
        cap_glo = head.t_global_w(cap_i, torch.tensor([n_word], device=cap_emb.device))
        attn = torch.bmm(img_emb, cap_rep.transpose(1, 2))                          # (n_img, K, L)
        attn = l2norm(torch.nn.functional.leaky_relu(attn, 0.1), dim=2)
        attn = torch.softmax(attn.transpose(1, 2) * LAMBDA_SOFTMAX, dim=2)         # (n_img, L, K)
        context = l2norm(torch.bmm(attn, img_emb), dim=-1)
        sim_loc = l2norm(head.sim_tranloc_w((context - cap_rep).pow(2)), dim=-1)
        sim_glo = l2norm(head.sim_tranglo_w((img_glo - cap_glo).pow(2)), dim=-1)
        x = torch.cat([sim_glo[:, None], sim_loc], 1)                              # (n_img, L + 1, s)
        if head.module_name == "SGR":
            for step in head.SGR_module:
                q, k = step.graph_query_w(x), step.graph_key_w(x)
                edge = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
                x = torch.relu(step.sim_graph_w(torch.bmm(edge, x)))
            vec = x[:, 0]
        else:
            saf = head.SAF_module
            gate = torch.sigmoid(saf.bn(saf.attn_sim_w(x).permute(0, 2, 1)))      # (n_img, 1, L + 1)
            gate = gate / (gate.abs().sum(dim=-1, keepdim=True) + EPS)
            vec = l2norm(torch.matmul(gate, x).squeeze(1), dim=-1)
        columns.append(torch.sigmoid(head.sim_eval_w(vec)))
    return torch.cat(columns, 1)


@torch.no_grad()
def official_style_sims(head: SGRAFSimilarity, img_emb: Tensor, cap_emb: Tensor, cap_lens, *, shard_size: int = 100,
                        max_captions: int | None = None) -> Tensor:
    """The official ``shard_attn_scores``: shards of ``shard_size`` images x ``shard_size`` captions, each scored by
    :func:`official_style_forward` (so the image globals are recomputed per caption shard and the caption globals
    per image shard). ``max_captions`` scores only the first captions (benchmarks extrapolate from a subset).
    Returns (N_img, n_scored_captions) in the inputs' dtype. Eval mode is the caller's business, as officially."""
    n_img = img_emb.shape[0]
    n_cap = cap_emb.shape[0] if max_captions is None else min(cap_emb.shape[0], max_captions)
    lens = [int(x) for x in cap_lens]
    out = torch.zeros(n_img, n_cap, dtype=img_emb.dtype)
    for i0 in range(0, n_img, shard_size):
        for c0 in range(0, n_cap, shard_size):
            c1 = min(n_cap, c0 + shard_size)
            out[i0:i0 + shard_size, c0:c1] = official_style_forward(head, img_emb[i0:i0 + shard_size],
                                                                    cap_emb[c0:c1], lens[c0:c1])
    return out


# ------------------------------------------------------------------------------------------------------------------
# The whole SGRAF model (encoders + head) and the official checkpoint
# ------------------------------------------------------------------------------------------------------------------

def recipe_schedule(module: str, dataset: str = "f30k") -> tuple[int, int]:
    """The official ``(num_epochs, lr_update)`` of ``module`` ("SGR" | "SAF") on ``dataset`` ("f30k" | "coco"):
    Flickr30K SGR 40 / 30, SAF 30 / 20; COCO 20 / 10 for both."""
    if (dataset, module) not in RECIPE_SCHEDULES:
        raise ValueError(f"no official schedule for module={module!r} on dataset={dataset!r}; known: "
                         f"{sorted(RECIPE_SCHEDULES)}")
    return RECIPE_SCHEDULES[(dataset, module)]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"SGRAFConfig.{name} must be a positive int, got {value!r}")
    return int(value)


def _finite_number(value, name: str, low: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or (low is not None and value < low):
        need = "a finite number" if low is None else f"a finite number >= {low}"
        raise ValueError(f"SGRAFConfig.{name} must be {need}, got {value!r}")
    return float(value)


@dataclass
class SGRAFConfig:
    """SGRAF hyper-parameters, named as the official ``opts.py`` options (plain data only).

    Model: ``vocab_size`` (embedding rows, ``len(vocab)``), ``word_dim``, ``embed_size`` (d), ``sim_dim`` (s),
    ``num_layers``, ``bi_gru``, ``img_dim``, ``no_imgnorm``, ``no_txtnorm``, ``module_name`` ("SGR" | "SAF"),
    ``sgr_step``. Training: ``margin``, ``max_violation`` (hardest negatives), ``grad_clip``, ``learning_rate``,
    ``lr_update`` (epochs per 10x decay), ``num_epochs``, ``batch_size``.

    Defaults are the official parser's, which (unlike SCAN's) turns ``bi_gru`` and ``max_violation`` on: batch 128,
    Adam lr 2e-4, margin 0.2, grad clip 2, sim_dim 256, 3 SGR steps. ``num_epochs`` and ``lr_update`` left as None
    take the Flickr30K schedule of the module (:func:`recipe_schedule`: SGR 40 / 30, SAF 30 / 20; pass 20 / 10 for
    COCO). The attention's lambda (9) and the dropout rates (0.4) are fixed by the model, as officially.
    """

    vocab_size: int
    word_dim: int = 300
    embed_size: int = 1024
    sim_dim: int = 256
    num_layers: int = 1
    bi_gru: bool = True
    img_dim: int = 2048
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    module_name: str = "SGR"
    sgr_step: int = 3
    margin: float = 0.2
    max_violation: bool = True
    grad_clip: float = 2.0
    learning_rate: float = 2e-4
    lr_update: int | None = None
    num_epochs: int | None = None
    batch_size: int = 128

    def __post_init__(self):
        if self.module_name not in MODULES:
            raise ValueError(f"SGRAFConfig.module_name must be one of {MODULES}, got {self.module_name!r}")
        epochs, lr_update = recipe_schedule(self.module_name)
        self.num_epochs = epochs if self.num_epochs is None else self.num_epochs
        self.lr_update = lr_update if self.lr_update is None else self.lr_update
        for name in ("vocab_size", "word_dim", "embed_size", "sim_dim", "num_layers", "img_dim", "sgr_step",
                     "lr_update", "num_epochs", "batch_size"):
            setattr(self, name, _positive_int(getattr(self, name), name))
        for name in ("bi_gru", "no_imgnorm", "no_txtnorm", "max_violation"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"SGRAFConfig.{name} must be a bool, got {value!r}")
            setattr(self, name, bool(value))
        for name, low in (("margin", None), ("grad_clip", 0.0), ("learning_rate", 0.0)):
            setattr(self, name, _finite_number(getattr(self, name), name, low))

    @classmethod
    def from_opt(cls, opt) -> "SGRAFConfig":
        """Build from an official ``argparse.Namespace`` (or dict): the fields above are taken, the rest (paths,
        workers, logging) ignored. ``vocab_size`` is required."""
        return cls(**opt_fields(cls, opt))

    def to_dict(self) -> dict:
        """Plain-data dict of every field (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)


class SGRAFTextEncoder(nn.Module):
    """SGRAF's ``EncoderText``: SCAN's text encoder (``itm_models.encoders.EncoderText``) with the GRU named
    ``cap_rnn`` and Dropout(0.4) on the word embeddings in training. Keys ``embed.weight``, ``cap_rnn.*``.

    Args as :class:`itm_models.encoders.EncoderText` (SGRAF defaults ``use_bi_gru`` on).
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1,
                 use_bi_gru: bool = True, no_txtnorm: bool = False):
        super().__init__()
        self.vocab_size, self.embed_size = int(vocab_size), int(embed_size)
        self.use_bi_gru, self.no_txtnorm = bool(use_bi_gru), bool(no_txtnorm)
        # Official construction order (embedding, dropout, GRU, then the embedding's U(-0.1, 0.1)).
        self.embed = nn.Embedding(self.vocab_size, word_dim)
        self.dropout = nn.Dropout(DROPOUT)
        self.cap_rnn = nn.GRU(word_dim, self.embed_size, num_layers, batch_first=True, bidirectional=self.use_bi_gru)
        with torch.no_grad():
            self.embed.weight.uniform_(-0.1, 0.1)

    def forward(self, ids: Tensor, lengths) -> Tensor:
        """(N, L_max) token ids, (N,) lengths in 1..L_max (any order) -> (N, L_max, embed_size) word embeddings,
        exact zeros beyond each length."""
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        from .encoders import _check_captions

        ids, lens = _check_captions(ids, lengths, self.vocab_size)
        l_max = ids.shape[1]
        valid = (torch.arange(l_max)[None, :] < lens[:, None]).to(ids.device)
        x = self.dropout(self.embed(torch.where(valid, ids, torch.zeros((), dtype=ids.dtype, device=ids.device))))
        packed = pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=bool((lens[:-1] >= lens[1:]).all()))
        out, _ = self.cap_rnn(packed)
        cap_emb, _ = pad_packed_sequence(out, batch_first=True, total_length=l_max)
        if self.use_bi_gru:
            half = cap_emb.shape[2] // 2
            cap_emb = (cap_emb[:, :, :half] + cap_emb[:, :, half:]) / 2
        return cap_emb if self.no_txtnorm else l2norm(cap_emb)


class SGRAF(nn.Module):
    """SGRAF: ``img_enc`` (SCAN's precomputed-region encoder), ``txt_enc`` (:class:`SGRAFTextEncoder`) and
    ``sim_enc`` (:class:`SGRAFSimilarity`), built in the official order. The interface of
    :func:`itm_models.evaluation.similarity_matrix`: :meth:`encode_images`, :meth:`encode_captions`, :meth:`sims`.

    ``model.config`` is an :class:`SGRAFConfig` (built from the arguments, or the one given to
    :meth:`from_config`), so :func:`itm_models.checkpoints.save_checkpoint` / ``load_checkpoint`` round-trip the
    model (model type ``"sgraf"``).
    """

    model_type = "sgraf"

    def __init__(self, *, vocab_size: int, img_dim: int = 2048, word_dim: int = 300, embed_size: int = 1024,
                 sim_dim: int = 256, num_layers: int = 1, bi_gru: bool = True, no_imgnorm: bool = False,
                 no_txtnorm: bool = False, module: str = "SGR", sgr_step: int = 3):
        super().__init__()
        from .encoders import EncoderImagePrecomp

        self.config = SGRAFConfig(vocab_size=vocab_size, word_dim=word_dim, embed_size=embed_size, sim_dim=sim_dim,
                                  num_layers=num_layers, bi_gru=bi_gru, img_dim=img_dim, no_imgnorm=no_imgnorm,
                                  no_txtnorm=no_txtnorm, module_name=module, sgr_step=sgr_step)
        self.img_enc = EncoderImagePrecomp(img_dim, embed_size, no_imgnorm)
        self.txt_enc = SGRAFTextEncoder(vocab_size, word_dim, embed_size, num_layers, bi_gru, no_txtnorm)
        self.sim_enc = SGRAFSimilarity(embed_size, sim_dim, module, sgr_step)

    @classmethod
    def from_config(cls, config: SGRAFConfig, backend: str = "auto") -> "SGRAF":
        """Build the model that ``config`` describes and keep ``config`` (training fields included) on
        ``model.config``. ``backend`` is accepted for the interface of
        :func:`itm_models.checkpoints.load_checkpoint` and unused: the head's ``local_sim`` has one CPU path."""
        if not isinstance(config, SGRAFConfig):
            raise TypeError(f"config must be an SGRAFConfig, got {type(config).__name__}")
        model = cls(vocab_size=config.vocab_size, img_dim=config.img_dim, word_dim=config.word_dim,
                    embed_size=config.embed_size, sim_dim=config.sim_dim, num_layers=config.num_layers,
                    bi_gru=config.bi_gru, no_imgnorm=config.no_imgnorm, no_txtnorm=config.no_txtnorm,
                    module=config.module_name, sgr_step=config.sgr_step)
        model.config = config
        return model

    @property
    def module_name(self) -> str:
        """"SGR" or "SAF"."""
        return self.sim_enc.module_name

    def encode_images(self, images: Tensor) -> Tensor:
        """(N, 36, img_dim) precomputed region features -> (N, 36, d)."""
        return self.img_enc(images)

    def encode_captions(self, ids: Tensor, lengths) -> Tensor:
        """(N, L_max) ids, (N,) lengths -> (N, L_max, d), zeros beyond each length."""
        return self.txt_enc(ids, lengths)

    def sims(self, img_emb: Tensor, cap_emb: Tensor, cap_lens, **kwargs) -> Tensor:
        """All-pairs scores (N_img, N_cap): :meth:`SGRAFSimilarity.sims` (same keyword arguments)."""
        return self.sim_enc.sims(img_emb, cap_emb, cap_lens, **kwargs)

    def forward(self, images: Tensor, ids: Tensor, lengths) -> Tensor:
        """A training batch: (B, 36, img_dim), (B, L_max) ids, (B,) lengths -> (B, B) scores (diagonal positive)."""
        lens = torch.as_tensor(lengths)
        return self.sim_enc(self.encode_images(images), self.encode_captions(ids, lens), lens.to(images.device))

    def official_state_dicts(self) -> list[dict]:
        """``[img_enc, txt_enc, sim_enc]`` state_dicts: the official checkpoint's ``model`` list."""
        return [self.img_enc.state_dict(), self.txt_enc.state_dict(), self.sim_enc.state_dict()]

    def load_official_state_dicts(self, state_dicts) -> None:
        if len(state_dicts) != 3:
            raise ValueError(f"an SGRAF model list has 3 state_dicts [img_enc, txt_enc, sim_enc], got "
                             f"{len(state_dicts)}")
        for name, module, sd in zip(("img_enc", "txt_enc", "sim_enc"), (self.img_enc, self.txt_enc, self.sim_enc),
                                    state_dicts):
            try:
                module.load_state_dict(sd, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"model list entry {name} does not fit the model built from opt: {exc}") from None


def build_sgraf_from_official(checkpoint: dict) -> SGRAF:
    """Rebuild an official SGRAF model from its checkpoint dict (``torch.load`` of ``model_best.pth.tar``, or
    :func:`itm_models.checkpoints.read_official_checkpoint`'s result): ``opt`` (Namespace or dict) gives the
    sizes, ``model`` = [img_enc, txt_enc, sim_enc] state_dicts, loaded strictly. Returns the model in eval mode.
    """
    opt = checkpoint["opt"]
    opt = dict(opt) if isinstance(opt, dict) else dict(vars(opt))
    module = opt.get("module_name", "SGR")
    model = SGRAF(vocab_size=int(opt["vocab_size"]), img_dim=int(opt.get("img_dim", 2048)),
                  word_dim=int(opt.get("word_dim", 300)), embed_size=int(opt.get("embed_size", 1024)),
                  sim_dim=int(opt.get("sim_dim", 256)), num_layers=int(opt.get("num_layers", 1)),
                  bi_gru=bool(opt.get("bi_gru", True)), no_imgnorm=bool(opt.get("no_imgnorm", False)),
                  no_txtnorm=bool(opt.get("no_txtnorm", False)), module=module,
                  sgr_step=int(opt.get("sgr_step", 3)))
    model.load_official_state_dicts(checkpoint["model"])
    return model.eval()


class SGRAFEnsemble(nn.Module):
    """Element-wise mean of several SGRAF models' similarity matrices: the paper's SGRAF row is an SGR and an SAF
    model (the official evaluation averages their two sims matrices). Each member keeps its own encoders.

    Args:
        models: non-empty sequence of :class:`SGRAF` (any mix of modules and sizes).

    Raises:
        ValueError: no model. TypeError: a member that is not an :class:`SGRAF`.
    """

    def __init__(self, models: Sequence[SGRAF]):
        super().__init__()
        if isinstance(models, nn.Module):
            raise TypeError(f"models must be a sequence of SGRAF models, got a single {type(models).__name__}; "
                            "wrap it in a list")
        models = list(models)
        if not models:
            raise ValueError("SGRAFEnsemble needs at least one model (models is empty)")
        for i, m in enumerate(models):
            if not isinstance(m, SGRAF):
                raise TypeError(f"models[{i}] is a {type(m).__name__}, expected SGRAF")
        self.models = nn.ModuleList(models)

    @property
    def module_names(self) -> tuple[str, ...]:
        """The members' modules, e.g. ("SGR", "SAF")."""
        return tuple(m.module_name for m in self.models)

    def encode_images(self, images: Tensor) -> list[Tensor]:
        """(N, 36, img_dim) region features -> one (N, 36, d_m) embedding per member."""
        return [m.encode_images(images) for m in self.models]

    def encode_captions(self, ids: Tensor, lengths) -> list[Tensor]:
        """(N, L_max) ids, (N,) lengths -> one (N, L_max, d_m) embedding per member (zeros beyond each length)."""
        return [m.encode_captions(ids, lengths) for m in self.models]

    def _check_embeddings(self, img_embs, cap_embs) -> None:
        for name, embs in (("img_embs", img_embs), ("cap_embs", cap_embs)):
            if isinstance(embs, Tensor) or not isinstance(embs, (list, tuple)):
                raise ValueError(f"{name} must be a list with one embedding tensor per member ({len(self.models)}), "
                                 f"as encode_images / encode_captions return, got {type(embs).__name__}")
            if len(embs) != len(self.models):
                raise ValueError(f"{name} holds {len(embs)} embeddings, expected {len(self.models)} (one per member)")

    def sims(self, img_embs: Sequence[Tensor], cap_embs: Sequence[Tensor], cap_lens, **kwargs) -> Tensor:
        """Mean over members of ``member.sims(img_embs[m], cap_embs[m], cap_lens, **kwargs)``.

        Args:
            img_embs: per member (N_img, 36, d_m). cap_embs: per member (N_cap, L_max, d_m). cap_lens: (N_cap,).
            **kwargs: passed to :meth:`SGRAFSimilarity.sims` (``dtype``, ``block_rows``, ``max_tile_bytes``).
        Returns:
            (N_img, N_cap) float32 (float64 for float64 embeddings) mean scores.
        """
        self._check_embeddings(img_embs, cap_embs)
        total = None
        for m, ie, ce in zip(self.models, img_embs, cap_embs):
            s = m.sims(ie, ce, cap_lens, **kwargs)
            total = s if total is None else total + s
        return total / len(self.models)

    def forward(self, images: Tensor, ids: Tensor, lengths) -> Tensor:
        """(B_img, 36, img_dim), (B_cap, L_max) ids, (B_cap,) lengths -> (B_img, B_cap) mean of the members'
        training-mode scores (:meth:`SGRAF.forward`)."""
        total = None
        for m in self.models:
            s = m(images, ids, lengths)
            total = s if total is None else total + s
        return total / len(self.models)


register_model_type("sgraf", SGRAFConfig, SGRAF.from_config)
