"""SGRAF head (SGR, SAF): the official goldens (state_dicts as is, scores within 1e-6), the fast all-pairs sims and
the training forward against a step-by-step restatement of the official loop (float64, ragged lengths, several
blocks, BatchNorm batch statistics and running-statistics updates, gradients), and the official checkpoint end to
end (encoders, sims, metrics)."""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import itm_models.sgraf.head as sgraf
from itm_kernels._common.fast_mm import brgemm_available

from itm_models.baselines.sgraf import official_style_forward, official_style_sims
from itm_models.sgraf import SGRAFSimilarity, build_sgraf_from_official
from conftest import assert_close_report, golden_path

HEADS = {"SGR": "sgraf_sgr_sim_enc.pt", "SAF": "sgraf_saf_sim_enc.pt"}


@pytest.fixture(scope="module")
def golden_inputs(scan_golden):
    g = np.load(golden_path("sgraf.npz"))
    assert np.array_equal(g["cap_lens"], scan_golden["cap_lens"])
    return (torch.from_numpy(scan_golden["img"]), torch.from_numpy(scan_golden["cap"]),
            torch.from_numpy(scan_golden["cap_lens"]), g)


def golden_head(module):
    head = SGRAFSimilarity(1024, 256, module, 3)
    head.load_state_dict(torch.load(golden_path(HEADS[module]), weights_only=True), strict=True)
    return head.eval()


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_golden_float32_and_float64(golden_inputs, module):
    """Official scores (float32 official code): ours in float32 and in float64 within 1e-6 absolute."""
    img, cap, lens, g = golden_inputs
    head = golden_head(module)
    expected = torch.from_numpy(g[f"{module.lower()}_sims"])
    got = head.sims(img, cap, lens)
    assert got.dtype == torch.float32 and got.shape == (12, 60)
    assert_close_report(got, expected, atol=1e-6, rtol=0, what=f"{module} float32")
    assert_close_report(head.sims(img.double(), cap.double(), lens), expected, atol=1e-6, rtol=0,
                        what=f"{module} float64")
    # several blocks and tiles give the same scores
    assert_close_report(head.sims(img, cap, lens, block_rows=3000, max_tile_bytes=1 << 19), expected, atol=1e-6,
                        rtol=0, what=f"{module} small blocks")


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_golden_bfloat16(golden_inputs, module):
    """bfloat16 matrix products (float32 normalisations): within 5e-4 of the official float32 scores (measured
    1.6e-4 SGR, 4.8e-5 SAF; the scores of these random heads span about 4e-3 (SGR) and 1e-2 (SAF))."""
    img, cap, lens, g = golden_inputs
    got = golden_head(module).sims(img, cap, lens, dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    assert_close_report(got, torch.from_numpy(g[f"{module.lower()}_sims"]), atol=5e-4, rtol=0,
                        what=f"{module} bfloat16")


def test_golden_official_style_loop(golden_inputs):
    """The restated official loop (the benchmark baseline and the oracle of the tests below) is the official code."""
    img, cap, lens, g = golden_inputs
    for module in HEADS:
        assert_close_report(official_style_sims(golden_head(module), img, cap, lens), torch.from_numpy(
            g[f"{module.lower()}_sims"]), atol=1e-6, rtol=0, what=f"{module} official-style loop")


# ------------------------------------------------------------------------------------------------------------------
# Random heads at small sizes, float64, against the official-style restatement
# ------------------------------------------------------------------------------------------------------------------

def random_head(module, seed, d=32, s=16, sgr_step=3):
    """A head with the official init, then random biases, BatchNorm affine parameters and running statistics, so
    that dropping any of them fails."""
    torch.manual_seed(seed)
    head = SGRAFSimilarity(d, s, module, sgr_step).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=torch.float64) * 0.2 - 0.1)
            elif isinstance(m, torch.nn.BatchNorm1d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64) * 0.4 + 0.8)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=torch.float64) * 0.2 - 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
    return head


def random_embeddings(seed, n_img=5, n_cap=7, L=9, d=32):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, 36, d, generator=g, dtype=torch.float64), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g, dtype=torch.float64), dim=-1)
    lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    lens[0], lens[-1] = 1, L
    pad = torch.arange(L)[None, :] >= lens[:, None]
    cap[pad] = 5.0                                                   # garbage padding: never read
    return img, cap, lens


@pytest.mark.parametrize("module, steps", [("SGR", 3), ("SGR", 1), ("SAF", 3)])
def test_sims_match_official_style_float64(module, steps):
    head = random_head(module, 3, sgr_step=steps).eval()
    img, cap, lens = random_embeddings(4)
    with torch.no_grad():
        expected = official_style_forward(head, img, cap, lens)
    for block_rows in (16384, 40):
        assert_close_report(head.sims(img, cap, lens, block_rows=block_rows, max_tile_bytes=2048), expected,
                            atol=1e-12, rtol=0, what=f"{module} sims, block_rows={block_rows}")
    assert_close_report(head(img, cap, lens), expected, atol=1e-12, rtol=0, what=f"{module} forward (eval)")
    with torch.no_grad():
        bf16 = head.float().sims(img.float(), cap.float(), lens, dtype=torch.bfloat16)
    assert_close_report(bf16, expected, atol=2e-2, rtol=0, what=f"{module} bfloat16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sgr_step_matches_unfused_path(monkeypatch, dtype):
    """The fused CPU steps (``sgr_step_``: per chunk of pairs one [Y | U] brgemm, then logits, softmax and A U per
    pair in C++; the last
    step's global-node attention by ``sgr_global_attend``) against
    the unfused torch step and the float64 official-style loop. float32: 1e-6 of the official-style scores;
    bfloat16: the fused step accumulates the logits and A U in float32 where the unfused one rounds them to
    bfloat16, so both are held to 2e-2 of float64 and to 1e-2 of each other."""
    import itm_models.sgraf.head as sgraf

    if dtype == torch.bfloat16 and not brgemm_available(torch.bfloat16):
        pytest.skip("the fused bfloat16 SGR step needs AVX-512-BF16 (bf16_gemm brgemm-vnni); this CPU falls back "
                    "to the unfused step by design")
    head = random_head("SGR", 5, d=32, s=64).eval()
    img, cap, lens = random_embeddings(6, n_img=6, n_cap=9, L=11)
    with torch.no_grad():
        expected = official_style_forward(head, img, cap, lens)
    head = head.float()
    calls = []
    real = torch.ops.itm_kernels.sgr_step_
    monkeypatch.setattr(torch.ops.itm_kernels, "sgr_step_", lambda *a: (calls.append(1), real(*a))[1],
                        raising=False)
    fused_last, real_last = [], torch.ops.itm_kernels.sgr_global_attend
    monkeypatch.setattr(torch.ops.itm_kernels, "sgr_global_attend",
                        lambda *a: (fused_last.append(1), real_last(*a))[1], raising=False)
    fused = head.sims(img.float(), cap.float(), lens, dtype=dtype, block_rows=50)
    assert len(calls) >= 2 * 2, "the fused step did not run (2 steps x at least 2 blocks expected)"
    assert fused_last, "the fused last step did not run"
    monkeypatch.setattr(sgraf, "_fused_step_applies", lambda x, step: False)
    unfused = head.sims(img.float(), cap.float(), lens, dtype=dtype, block_rows=50)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert_close_report(fused, expected, atol=tol, rtol=0, what=f"fused {dtype}")
    assert_close_report(unfused, expected, atol=tol, rtol=0, what=f"unfused {dtype}")
    assert_close_report(fused, unfused, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0, what="fused/unfused")


def _sgr_step_reference(x, pg, c, bias, counts):
    """One SGR step as sgr_step_ defines it, in float64: logits (X_i P + c) . X_j over the pair's valid nodes j,
    softmax, X'_i = ReLU(sum_j A_ij (X_j W_g^T) + b_g) for valid i; other rows zero."""
    x64, s = x.double(), x.shape[2]
    p, g_w_t = pg.double()[:, :s], pg.double()[:, s:]
    out = torch.zeros_like(x64)
    for q, m in enumerate(counts.tolist()):
        xv = x64[q, :m]
        attn = torch.softmax((xv @ p + c.double()) @ xv.t(), dim=-1)
        out[q, :m] = torch.relu(attn @ (xv @ g_w_t) + bias.double())
    return out


@settings(max_examples=25, deadline=None)
@given(pairs=st.integers(1, 40), n=st.one_of(st.integers(1, 24), st.just(300)), s=st.sampled_from([64, 128]),
       bf16=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_sgr_step_kernel_matches_its_definition(pairs, n, s, bf16, seed):
    """sgr_step_ in place over ragged node counts (padding slots, chunks of ~256 valid rows, one pair with more rows
    than a chunk) against the step's float64 definition. Tolerance: float32 2e-5 absolute; bfloat16 the output's
    own rounding (2^-8 relative) plus the rounded [P | W_g^T] products, 3e-2."""
    if not sgraf._has_cpu_op("sgr_step_") or (bf16 and not brgemm_available(torch.bfloat16)):
        pytest.skip("the fused SGR kernel for this dtype is not available on this machine")
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    counts = torch.randint(1, n + 1, (pairs,), generator=g)
    x = torch.randn(pairs, n, s, generator=g) / s ** 0.5
    x[torch.arange(n)[None, :] >= counts[:, None]] = float("nan")       # padding slots are never read
    pg = (torch.randn(s, 2 * s, generator=g) / s ** 0.5).to(dtype)
    c, bias = torch.randn(s, generator=g) * 0.1, torch.randn(s, generator=g) * 0.1
    x = x.to(dtype)
    expected = _sgr_step_reference(torch.nan_to_num(x.float(), nan=0.0), pg.float(), c, bias, counts)
    torch.ops.itm_kernels.sgr_step_(x, pg, c, bias, counts)
    assert_close_report(x.double(), expected, atol=2e-5 if not bf16 else 3e-2, rtol=0 if not bf16 else 1e-2,
                        what=f"sgr_step_ {dtype}")


def test_bfloat16_without_vnni_brgemm_runs_the_torch_steps(monkeypatch):
    """Where bfloat16 products are claimed native but brgemm cannot read VNNI-packed bfloat16, bfloat16 SGR runs the
    torch steps instead of calling sgr_step_ (which refuses that machine), with the same scores to bfloat16
    rounding. (A CPU without a native bf16 dot product never gets here: it widens to the float32 kernels, which
    tests/cpu_isa/test_bf16_widening.py checks; native_bf16 is forced so this branch runs at every SIMD level.)"""
    import itm_models.sgraf.head as sgraf

    head = random_head("SGR", 7, d=32, s=64).eval().float()
    img, cap, lens = random_embeddings(7, n_img=4, n_cap=6, L=9)
    with torch.no_grad():
        fused = head.sims(img.float(), cap.float(), lens, dtype=torch.bfloat16)
    monkeypatch.setattr(sgraf, "native_bf16", lambda: True)
    monkeypatch.setattr(sgraf, "brgemm_available", lambda dtype: dtype != torch.bfloat16)
    monkeypatch.setattr(torch.ops.itm_kernels, "sgr_step_", lambda *a: pytest.fail("sgr_step_ was called"),
                        raising=False)
    with torch.no_grad():
        fallback = head.sims(img.float(), cap.float(), lens, dtype=torch.bfloat16)
    assert_close_report(fallback, fused, atol=1e-2, rtol=0, what="torch steps vs fused, bfloat16")


def test_sgr_kernels_check_their_inputs():
    """The C++ boundary of sgr_step_ and sgr_global_attend: every malformed argument is a RuntimeError naming it, never a crash."""
    P, n, s = 3, 5, 64
    x, pg = torch.zeros(P, n, s), torch.zeros(s, 2 * s)
    c, b, counts = torch.zeros(s), torch.zeros(s), torch.full((P,), n)
    op = torch.ops.itm_kernels.sgr_step_
    op(x, pg, c, b, counts)                                          # well-formed: runs
    cases = [((torch.zeros(P, n, 16), torch.zeros(16, 32), torch.zeros(16), torch.zeros(16), counts),
              "multiple of 64"),
             ((x.double(), pg.double(), c, b, counts), "float32 or bfloat16"),
             ((x, torch.zeros(s, s), c, b, counts), "pg must be"),
             ((x, pg.bfloat16(), c, b, counts), "pg must be"),
             ((x, pg, torch.zeros(s + 1), b, counts), "c must be"),
             ((x, pg, c, b.double(), counts), "bias must be"),
             ((x, pg, c, b, counts.int()), "node_counts must be"),
             ((x, pg, c, b, torch.tensor([1, n + 1, 2])), "outside 1.."),
             ((x, pg, c, b, torch.tensor([1, 0, 2])), "outside 1.."),
             ((x.transpose(1, 2).contiguous().transpose(1, 2), pg, c, b, counts), "contiguous")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    attend = torch.ops.itm_kernels.sgr_global_attend
    assert attend(x, torch.zeros(P, s), counts).shape == (P, s)
    for args, message in [((x, torch.zeros(P, s + 16), counts), "y0 must be"),
                          ((x, torch.zeros(P, s).double(), counts), "y0 must be"),
                          ((x, torch.zeros(P, s), torch.tensor([1, 9, 1])), "outside 1.."),
                          ((x.double(), torch.zeros(P, s), counts), "float32 or bfloat16")]:
        with pytest.raises(RuntimeError, match=message):
            attend(*args)


def _no_dropout(head):
    for m in head.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return head


@pytest.mark.parametrize("module, momentum", [("SGR", 0.1), ("SAF", 0.1), ("SAF", None)])
def test_training_forward_matches_official_style(module, momentum):
    """Training mode (dropout off to compare): batch-statistics BatchNorms, running-statistics updates (SAF: one per
    caption, in caption order) and every gradient, against the official loop restated."""
    ours = _no_dropout(random_head(module, 5)).train()
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.momentum = momentum
    theirs = copy.deepcopy(ours)
    img, cap, lens = random_embeddings(6, n_img=4, n_cap=6)
    inputs = [(img.clone().requires_grad_(), cap.clone().requires_grad_()) for _ in range(2)]
    weights = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = ours(inputs[0][0], inputs[0][1], lens)
    expected = official_style_forward(theirs, inputs[1][0], inputs[1][1], lens)
    assert_close_report(got, expected, atol=1e-12, rtol=0, what="training scores")
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        # graph_key_w.bias cancels in the row softmax: its gradient is exactly 0 (None for us, rounding for them)
        mine = torch.zeros_like(p) if p.grad is None and name.endswith("graph_key_w.bias") else p.grad
        assert_close_report(mine, q.grad, atol=1e-10, rtol=1e-8, what=f"grad {name}")
    assert_close_report(inputs[0][0].grad, inputs[1][0].grad, atol=1e-10, rtol=1e-8, what="grad img")
    assert_close_report(inputs[0][1].grad, inputs[1][1].grad, atol=1e-10, rtol=1e-8, what="grad cap")
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers()):
        assert_close_report(b, c, atol=1e-12, rtol=0, what=f"buffer {name}")


def test_training_dropout_is_active():
    head = random_head("SAF", 1).train()
    img, cap, lens = random_embeddings(2)
    torch.manual_seed(0)
    a = head(img, cap, lens)
    b = head(img, cap, lens)
    assert not torch.equal(a, b)
    head.eval()
    assert torch.equal(head(img, cap, lens), head(img, cap, lens))


def test_sims_ignore_training_mode_and_padding():
    head = random_head("SGR", 2).train()
    img, cap, lens = random_embeddings(3)
    first = head.sims(img, cap, lens)
    assert head.training
    zero_pad = cap.clone()
    zero_pad[torch.arange(cap.shape[1])[None, :] >= lens[:, None]] = 0
    assert torch.equal(first, head.eval().sims(img, zero_pad, lens))


def test_bad_inputs():
    head = random_head("SGR", 0)
    img, cap, lens = random_embeddings(0)
    with pytest.raises(ValueError, match="36"):
        head.sims(img[:, :30], cap, lens)
    with pytest.raises(ValueError, match="cap_lens"):
        head.sims(img, cap, lens[:-1])
    with pytest.raises(ValueError, match="1..9"):
        head.sims(img, cap, lens + 1)
    with pytest.raises(ValueError, match="module"):
        SGRAFSimilarity(32, 16, "AVE")


# ------------------------------------------------------------------------------------------------------------------
# The official SGRAF (SAF) checkpoint, end to end
# ------------------------------------------------------------------------------------------------------------------

def test_official_checkpoint_end_to_end():
    from itm_models.eval.metrics import recall

    ckpt = torch.load(golden_path("sgraf_checkpoint.pth.tar"), weights_only=False)   # trusted golden file
    g = np.load(golden_path("sgraf_checkpoint_golden.npz"))
    model = build_sgraf_from_official(ckpt)
    assert not model.training
    with torch.no_grad():
        img_emb = model.encode_images(torch.from_numpy(g["images_raw"]))
        cap_emb = model.encode_captions(torch.from_numpy(g["captions_ids"]), torch.from_numpy(g["caption_lens"]))
    assert_close_report(img_emb, torch.from_numpy(g["img_embs"]), atol=1e-5, rtol=0, what="image embeddings")
    assert_close_report(cap_emb, torch.from_numpy(g["cap_embs"]), atol=1e-5, rtol=0, what="caption embeddings")
    sims = model.sims(img_emb, cap_emb, torch.from_numpy(g["caption_lens"]))
    assert_close_report(sims, torch.from_numpy(g["sims"]), atol=1e-6, rtol=0, what="checkpoint sims")
    metrics, ranks = recall(sims.numpy(), return_ranks=True)
    assert metrics == {k: float(g[f"metric_{k}"]) for k in metrics}
    for k in ("i2t_ranks", "t2i_ranks", "i2t_top1", "t2i_top1"):
        assert np.array_equal(ranks[k], g[k]), k
    # and back: the official model list round-trips
    again = build_sgraf_from_official({"opt": ckpt["opt"], "model": model.official_state_dicts()})
    assert torch.equal(again.sims(img_emb, cap_emb, torch.from_numpy(g["caption_lens"])), sims)


def test_official_checkpoint_training_step():
    """The whole (SAF) model trains: scores of a batch in training mode (dropout in the text encoder and the head);
    the hinge loss's gradient reaches every encoder and head weight, finite."""
    ckpt = torch.load(golden_path("sgraf_checkpoint.pth.tar"), weights_only=False)
    g = np.load(golden_path("sgraf_checkpoint_golden.npz"))
    model = build_sgraf_from_official(ckpt).train()
    images = torch.from_numpy(g["images_raw"][:4])
    ids, lens = torch.from_numpy(g["captions_ids"][::5][:4]), torch.from_numpy(g["caption_lens"][::5][:4])
    scores = model(images, ids, lens)
    assert scores.shape == (4, 4)
    diag = scores.diag()[:, None]
    loss = (0.2 + scores - diag).clamp(min=0).fill_diagonal_(0).sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("call", ["sims", "forward"])
def test_bad_inputs_are_named_errors(call):
    """Every malformed argument of sims/forward is a clear error naming it, before any kernel runs."""
    head = random_head("SGR", 11).eval()
    img, cap, lens = random_embeddings(11)
    run = (lambda *a, **k: head.sims(*a, **k)) if call == "sims" else (lambda *a, **k: head(*a))
    cases = [
        ((img[:0], cap, lens), ValueError, "img_emb must not be empty"),
        ((img, cap[:0], lens[:0]), ValueError, "cap_emb must not be empty"),
        ((img.long(), cap, lens), TypeError, "img_emb must be float16, bfloat16, float32 or float64"),
        ((img, cap.float(), lens), TypeError, "img_emb and cap_emb must have the same dtype"),
        ((img[:, :35], cap, lens), ValueError, "img_emb must be (N_img, 36, 32)"),
        ((img, cap[..., :16], lens), ValueError, "cap_emb must be (N_cap, L_max, 32)"),
        ((img, cap, lens.double()), TypeError, "cap_lens must hold integers"),
        ((img, cap, lens[:-1]), ValueError, "cap_lens must have shape (7,)"),
        ((img, cap, torch.where(lens == 1, 0, lens)), ValueError, "cap_lens must lie in 1..9"),
        ((img, cap, torch.where(lens == 9, 10, lens)), ValueError, "cap_lens must lie in 1..9"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            run(*args)
    if call == "sims":
        with pytest.raises(TypeError, match="dtype must be None or one of"):
            head.sims(img, cap, lens, dtype=torch.int32)


@settings(max_examples=20, deadline=None)
@given(n_img=st.integers(1, 5), n_cap=st.integers(1, 7), L=st.integers(1, 12), s=st.sampled_from([16, 48, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_fused_saf_scores_match_the_torch_path( n_img, n_cap, L, s, dtype, seed):
    """Eval-mode SAF through the fused kernel (saf_scores: gate, l1-normalised pooling, l2norm, score in one pass)
    against the torch ops it replaces and the float64 official-style loop; ragged lengths, several blocks.
    Tolerance: 1e-6 absolute in float32 (scores lie in (0, 1)); bfloat16 products: 2e-2 of float64, 1e-6 between
    the two pooling paths (they share the node tensor)."""
    import itm_models.sgraf.head as sgraf

    head = random_head("SAF", seed % 1000, d=32, s=s).eval()
    img, cap, lens = random_embeddings(seed, n_img=n_img, n_cap=n_cap, L=L)
    with torch.no_grad():
        expected = official_style_forward(head, img, cap, lens)
    head = head.float()
    calls = []
    real = torch.ops.itm_kernels.saf_scores
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.itm_kernels, "saf_scores", lambda *a: (calls.append(1), real(*a))[1], raising=False)
        fused = head.sims(img.float(), cap.float(), lens, dtype=dtype, block_rows=40)
    assert calls, "the fused SAF kernel did not run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sgraf, "_fused_saf_applies", lambda x: False)
        unfused = head.sims(img.float(), cap.float(), lens, dtype=dtype, block_rows=40)
    assert_close_report(fused, unfused, atol=1e-6, rtol=0, what=f"fused vs torch SAF {dtype}")
    assert_close_report(fused, expected, atol=1e-6 if dtype == torch.float32 else 2e-2, rtol=0,
                        what=f"fused SAF vs official-style {dtype}")


def test_saf_scores_kernel_checks_its_inputs():
    """The C++ boundary of saf_scores: every malformed argument is a RuntimeError naming it, never a crash; padding
    slots (NaN here) are never read."""
    op = torch.ops.itm_kernels.saf_scores
    P, n, s = 3, 4, 32
    x, counts, w = torch.randn(P, n, s), torch.tensor([4, 1, 2]), torch.randn(s)
    x[1, 1:] = float("nan")
    x[2, 2:] = float("nan")
    assert torch.isfinite(op(x, counts, w, 1.0, 0.0, w, 0.0)).all()
    bad = [
        ((x.double(), counts, w, 1.0, 0.0, w, 0.0), "x must be a contiguous float32"),
        ((x.transpose(1, 2), counts, w, 1.0, 0.0, w, 0.0), "x must be a contiguous float32"),
        ((x[..., :24].contiguous(), counts, w[:24], 1.0, 0.0, w[:24], 0.0), "multiple of 16"),
        ((x, counts.int(), w, 1.0, 0.0, w, 0.0), "node_counts must be a contiguous int64"),
        ((x, counts[:2], w, 1.0, 0.0, w, 0.0), "node_counts must be a contiguous int64 (3,)"),
        ((x, torch.tensor([4, 0, 2]), w, 1.0, 0.0, w, 0.0), "node_counts[1] = 0 is outside 1..4"),
        ((x, torch.tensor([5, 1, 2]), w, 1.0, 0.0, w, 0.0), "node_counts[0] = 5 is outside 1..4"),
        ((x, counts, w[:16], 1.0, 0.0, w, 0.0), "gate_w must be a contiguous float32 (32,)"),
        ((x, counts, w, 1.0, 0.0, w.double(), 0.0), "eval_w must be a contiguous float32 (32,)"),
        ((x, counts, w, float("nan"), 0.0, w, 0.0), "must be finite"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            op(*args)
