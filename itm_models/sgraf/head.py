"""SGRAF similarity head (Paranioar/SGRAF ``EncoderSimilarity``: SGR and SAF) with a fused all-pairs evaluation.

Layers: :mod:`itm_models.sgraf.layers`; SAF's training BatchNorm: :mod:`itm_models.sgraf.batchnorm`.

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

import torch
from torch import Tensor, nn

from itm_kernels._common.validation import FLOAT_DTYPES, check_feature_pair, check_features, check_lengths
from itm_kernels._common.bf16_widen import native_bf16, widens_bf16_matmuls
from itm_kernels._common.dtypes import compute_dtype
from itm_kernels._common.fast_mm import brgemm_available, mm_float_out
from itm_kernels.local_sim import local_sim, local_sim_cpu, local_sim_gram

from ..encoders import l2norm
from .batchnorm import saf_batch_norm_train, update_running_stats
from .config import MODULES
from .layers import (DROPOUT, EPS, NUM_REGIONS, AttentionFiltration, GraphReasoning, TextSA, VisualSA,
                     _xavier_)

__all__ = ["SGRAFSimilarity", "LAMBDA_SOFTMAX", "DEFAULT_BLOCK_ROWS"]

LAMBDA_SOFTMAX = 9.0
# Rows of graph nodes (pairs x (L + 1)) scored at a time by ``sims``; see its docstring for the memory.
DEFAULT_BLOCK_ROWS = 8192
# bfloat16/float16: graph sizes L + 1 are rounded up to a multiple of this, so that the block shapes (and oneDNN's
# per-shape state) come from a small fixed set.
NODE_BUCKET_LOW_PRECISION = 4
# Items whose global vectors are computed at a time (in eval mode each item's global vector is its own).
GLOBAL_CHUNK = 64


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
        check_feature_pair(img_emb, cap_emb, names=("img_emb", "cap_emb"))
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
            z = saf_batch_norm_train(bn, z, node_valid, train_stats)
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
    @widens_bf16_matmuls
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
        if mm_dtype == torch.bfloat16 and img_emb.device.type == "cpu" and not native_bf16():
            mm_dtype = torch.float32  # no native bf16 dot product: the float32 kernels on the exactly widened values
        cdtype = compute_dtype(mm_dtype)
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

    @widens_bf16_matmuls
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
            update_running_stats(self.SAF_module.bn, means, variances)
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
    """Whether :meth:`SGRAFSimilarity._sgr` can run with the fused CPU kernels of csrc/sgr_step/cpu.cpp (``sgr_step_``
    for the steps before the last, ``sgr_global_attend`` for the last step's global node): inference (no autograd), a
    contiguous float32 or bfloat16 CPU node tensor with s a multiple of 64, the compiled extension loaded, and for
    bfloat16 a CPU whose brgemm reads VNNI-packed bfloat16 (AVX-512-BF16; elsewhere the torch path runs)."""
    return (not torch.is_grad_enabled() and "pg" in step and x.device.type == "cpu" and x.is_contiguous()
            and x.dtype in (torch.float32, torch.bfloat16) and x.shape[2] % 64 == 0 and _has_cpu_op("sgr_step_")
            and brgemm_available(x.dtype))


def _fused_saf_applies(x: Tensor) -> bool:
    """Whether the eval-mode SAF filtration and score can run as the fused CPU kernel ``saf_scores``
    (csrc/saf_scores/cpu.cpp): no autograd, a contiguous float32 CPU node tensor with s a multiple of 16, and the
    compiled extension loaded (float64 evaluation keeps the torch path)."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and x.is_contiguous() and x.shape[-1] % 16 == 0 and _has_cpu_op("saf_scores"))


def _has_cpu_op(name: str) -> bool:
    """Whether the compiled extension is loaded and registers ``torch.ops.itm_kernels.<name>``."""
    from itm_kernels._common.dispatch import load_extension

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
    from itm_kernels.xattn_sim.torch import caption_chunks

    for idx in caption_chunks(lens, words_per_chunk):
        yield idx.to(lens.device)
