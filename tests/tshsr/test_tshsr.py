"""TSHSR head (our design after the abstract): SGR consistency, shapes and ragged lengths, NaN/Inf padding, the
all-pairs ``sims`` against the plain per-pair loop, float64 gradcheck, config and input validation, streaming
top-k and ``similarity_matrix``. Paths checked: the torch head over ``local_sim``'s "auto" backend (the C++ kernel
where the extension is built)."""
from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itm_models import TSHSR, TSHSRConfig, TSHSREnsemble
from itm_models.baselines.tshsr import per_pair_sims
from itm_models.eval.similarity import similarity_matrix
from itm_models.eval.streaming import similarity_topk
from itm_models.sgraf import SGRAFSimilarity
from itm_models.tshsr import PhrasePooling, TSHSRSimilarity, phrase_count
from conftest import assert_close_report

K, D, S = 36, 8, 6
ALL = dict(streams=("t2i", "i2t"), levels=("global", "intermediate", "local"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny heads: one intra-op thread is as fast and immune to a busy machine."""


def features(n_img, lens, d=D, k=K, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, k, d, generator=g, dtype=torch.float64), dim=-1)
    lens = torch.as_tensor(lens)
    cap = torch.nn.functional.normalize(torch.randn(len(lens), int(lens.max()), d, generator=g,
                                                    dtype=torch.float64), dim=-1)
    cap = cap * (torch.arange(cap.shape[1])[None, :, None] < lens[:, None, None])
    return img.to(dtype), cap.to(dtype), lens


def head(seed=0, d=D, s=S, steps=2, **kw):
    torch.manual_seed(seed)
    h = TSHSRSimilarity(d, s, steps, **{**ALL, **kw}).double().eval()
    if hasattr(h, "v_global_w"):                           # non-trivial BatchNorm running statistics
        for m in h.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return h


def poison(cap, lens, values=(float("nan"), float("inf"), -float("inf"))):
    out = cap.clone()
    for c, length in enumerate(lens.tolist()):
        out[c, length:] = values[c % len(values)]
    return out


# ------------------------------------------------------------------------------------------------------------------
# consistency with SGRAF's SGR head
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 3])
def test_t2i_global_local_is_exactly_sgrafs_sgr_head(steps):
    torch.manual_seed(1)
    sgr = SGRAFSimilarity(D, S, "SGR", steps).double()
    for m in sgr.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = TSHSRSimilarity(D, S, steps, streams=("t2i",), levels=("global", "local"), hierarchy_bias=5.0).double()
    ours.load_sgr_state_dict(sgr.state_dict())
    img, cap, lens = features(3, [7, 1, 4, 7, 2])
    sgr.eval(), ours.eval()
    assert_close_report(ours(img, cap, lens), sgr(img, cap, lens), atol=1e-6, rtol=0, what="eval forward")
    assert_close_report(ours.sims(img, cap, lens), sgr.sims(img, cap, lens), atol=1e-6, rtol=0, what="sims")
    sgr.train(), ours.train()                             # dropout and BatchNorm batch statistics, same RNG draws
    torch.manual_seed(5)
    expected = sgr(img, cap, lens)
    torch.manual_seed(5)
    assert_close_report(ours(img, cap, lens), expected, atol=1e-6, rtol=0, what="training forward")


def test_float32_sims_agree_with_sgraf_sims():
    torch.manual_seed(2)
    sgr = SGRAFSimilarity(D, 64, "SGR", 3).eval()
    ours = TSHSRSimilarity(D, 64, 3, streams=("t2i",), levels=("global", "local")).eval()
    ours.load_sgr_state_dict(sgr.state_dict())
    img, cap, lens = features(4, [5, 9, 3], dtype=torch.float32)
    # float32: SGRAF's fused path folds W_q^T W_k; rounding differs, tolerance of float32 sums over s = 64
    assert_close_report(ours.sims(img, cap, lens), sgr.sims(img, cap, lens), atol=2e-6, rtol=0, what="fp32 sims")


def test_load_sgr_state_dict_refuses_what_does_not_fit():
    sgr = SGRAFSimilarity(D, S, "SGR", 2)
    with pytest.raises(ValueError, match="t2i stream and the global level"):
        TSHSRSimilarity(D, S, 2, streams=("i2t",)).load_sgr_state_dict(sgr.state_dict())
    with pytest.raises(ValueError, match="SAF"):
        TSHSRSimilarity(D, S, 2).load_sgr_state_dict(SGRAFSimilarity(D, S, "SAF").state_dict())
    with pytest.raises(ValueError, match="fewer steps"):
        TSHSRSimilarity(D, S, 3).load_sgr_state_dict(sgr.state_dict())
    with pytest.raises(ValueError, match="has no place"):
        TSHSRSimilarity(D, S, 1).load_sgr_state_dict(sgr.state_dict())
    with pytest.raises(ValueError, match="shape"):
        TSHSRSimilarity(D, S + 1, 2).load_sgr_state_dict(sgr.state_dict())


# ------------------------------------------------------------------------------------------------------------------
# shapes, ragged lengths, padding, the per-pair loop
# ------------------------------------------------------------------------------------------------------------------

OPTIONS = st.fixed_dictionaries({
    "streams": st.sampled_from([("t2i",), ("i2t",), ("t2i", "i2t")]),
    "levels": st.sampled_from([("local",), ("global", "local"), ("intermediate", "local"),
                               ("global", "intermediate", "local")]),
    "phrase_window": st.integers(1, 4), "region_groups": st.integers(1, 3),
    "fusion": st.sampled_from(["sum", "learned"]), "hierarchy_bias": st.sampled_from([0.0, 1.5]),
})


@settings(max_examples=12)
@given(opts=OPTIONS, n_img=st.integers(1, 3), lens=st.lists(st.integers(1, 7), min_size=1, max_size=4),
       block_rows=st.sampled_from([1, 50, 8192]), seed=st.integers(0, 3))
def test_sims_equals_the_per_pair_loop_and_ignores_poisoned_padding(opts, n_img, lens, block_rows, seed):
    h = head(seed, **opts)
    if opts["fusion"] == "learned":
        with torch.no_grad():
            h.fusion_logits.uniform_(-1, 1)
    img, cap, lens = features(n_img, lens, seed=seed)
    expected = per_pair_sims(h, img, cap, lens)               # each caption cut to its length: no padding at all
    got = h.sims(img, poison(cap, lens), lens, block_rows=block_rows)
    assert got.shape == (n_img, len(lens)) and got.dtype == torch.float64
    assert_close_report(got, expected, atol=1e-12, rtol=0, what=f"sims vs per-pair loop {opts}")
    forward = h(img, poison(cap, lens), lens)
    assert_close_report(forward, expected, atol=1e-12, rtol=0, what="batched forward vs per-pair loop")


def test_float32_and_bfloat16_sims_track_float64():
    h = head(3)
    img, cap, lens = features(3, [6, 2, 5, 1])
    ref = h.sims(img, cap, lens)
    h32 = h.float()
    got32 = h32.sims(img.float(), cap.float(), lens)
    assert got32.dtype == torch.float32
    assert_close_report(got32, ref, atol=1e-5, rtol=0, what="float32")
    got_bf16 = h32.sims(img.float(), cap.float(), lens, dtype=torch.bfloat16)
    assert got_bf16.dtype == torch.float32
    assert_close_report(got_bf16, ref, atol=5e-2, rtol=0, what="bfloat16 local_sim products")
    ref32 = copy.deepcopy(h32).double().sims(img, cap, lens)        # the float32 weights, exactly, in float64
    assert torch.equal(h32.sims(img, cap, lens), ref32) and next(h32.parameters()).dtype == torch.float32


def test_streams_and_fusion():
    h = head(4, fusion="learned")
    img, cap, lens = features(2, [5, 3, 1])
    parts = h.stream_scores(img, cap, lens)
    assert set(parts) == {"t2i", "i2t"}
    assert_close_report(h(img, cap, lens), parts["t2i"] + parts["i2t"], atol=1e-14, rtol=0,
                        what="learned fusion starts as the sum")
    with torch.no_grad():
        h.fusion_logits.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
    w = torch.softmax(torch.tensor([0.3, -0.2], dtype=torch.float64), 0) * 2
    assert_close_report(h(img, cap, lens), w[0] * parts["t2i"] + w[1] * parts["i2t"], atol=1e-14, rtol=0,
                        what="learned weights")


def test_hierarchy_bias_changes_the_scores_only_with_an_intermediate_level():
    img, cap, lens = features(2, [6, 4])
    a, b = head(6, hierarchy_bias=0.0), head(6, hierarchy_bias=3.0)
    assert (a.sims(img, cap, lens) - b.sims(img, cap, lens)).abs().max() > 1e-6
    a, b = head(6, hierarchy_bias=0.0, levels=("global", "local")), head(6, hierarchy_bias=3.0,
                                                                         levels=("global", "local"))
    assert torch.equal(a.sims(img, cap, lens), b.sims(img, cap, lens))


def test_phrase_pooling_windows_and_membership():
    assert phrase_count(torch.tensor([1, 3, 4, 5, 6, 7]), 3).tolist() == [1, 1, 2, 2, 3, 3]
    assert phrase_count(torch.tensor([1, 4]), 1).tolist() == [1, 4]
    pool = PhrasePooling(D, 3).double()
    _, cap, lens = features(1, [6, 2])
    phrases, counts, member = pool(poison(cap, lens), lens)
    assert counts.tolist() == [3, 1] and phrases.shape == (2, 3, D)
    assert member[0].tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]]
    assert member[1].tolist() == [[1, 1, 0, 0, 0, 0], [0] * 6, [0] * 6]
    assert torch.isfinite(phrases).all() and (phrases[1, 1:] == 0).all()
    assert_close_report(phrases.norm(dim=-1)[0], torch.ones(3, dtype=torch.float64), atol=1e-7, rtol=0,
                        what="unit phrases")


# ------------------------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [("global", "intermediate", "local"), ("intermediate", "local")])
def test_gradcheck_float64(levels):
    k = K if "global" in levels else 5
    h = head(7, d=4, s=3, steps=2, levels=levels, fusion="learned", region_groups=2)
    img, cap, lens = features(2, [4, 1, 3], d=4, k=k, seed=7)
    img.requires_grad_(True)
    cap = cap.clone().requires_grad_(True)
    bias = h.streams["t2i"].hierarchy_bias.detach().clone().requires_grad_(True)
    assign = h.streams["i2t"].region_groups.assign.weight.detach().clone().requires_grad_(True)

    def f(img, cap, bias, assign):
        params = {"streams.t2i.hierarchy_bias": bias, "streams.i2t.region_groups.assign.weight": assign}
        return torch.func.functional_call(h, params, (img, cap, lens))

    assert torch.autograd.gradcheck(f, (img, cap, bias, assign), eps=1e-6, atol=1e-7)


def test_padding_gets_no_gradient_and_poison_does_not_leak():
    h = head(8).train()
    img, cap, lens = features(3, [5, 2, 3], seed=8)
    cap = poison(cap, lens).requires_grad_(True)
    img = img.requires_grad_(True)
    torch.manual_seed(0)
    h(img, cap, lens).sum().backward()
    assert torch.isfinite(img.grad).all()
    valid = torch.arange(cap.shape[1])[None] < lens[:, None]
    assert torch.isfinite(cap.grad[valid]).all() and (cap.grad[~valid] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in h.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,match", [
    ("streams", ("t2i", "x"), "streams"), ("streams", (), "streams"), ("streams", "t2i", "streams"),
    ("levels", ("global",), "include 'local'"), ("levels", ("local", "local"), "distinct"),
    ("fusion", "max", "fusion"), ("phrase_window", 0, "phrase_window"), ("region_groups", 1.5, "region_groups"),
    ("hierarchy_bias", float("nan"), "hierarchy_bias"), ("sim_dim", -1, "sim_dim"), ("bi_gru", 1, "bi_gru"),
])
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=f"TSHSRConfig.*{match}"):
        TSHSRConfig(vocab_size=10, **{field: value})


def test_config_normalises_and_defaults_to_the_sgr_recipe():
    c = TSHSRConfig(vocab_size=10, streams=["i2t", "t2i"], levels=["local", "global"])
    assert c.streams == ("t2i", "i2t") and c.levels == ("global", "local")
    assert (c.num_epochs, c.lr_update, c.batch_size, c.learning_rate, c.margin, c.grad_clip, c.max_violation) == \
        (40, 30, 128, 2e-4, 0.2, 2.0, True)
    assert TSHSRConfig(**dataclasses.asdict(c)) == c
    assert TSHSRConfig.from_opt({"vocab_size": 7, "sim_dim": 4, "data_path": "x"}).sim_dim == 4


def test_bad_inputs_raise_named_errors():
    h = head(9)
    img, cap, lens = features(2, [3, 2])
    with pytest.raises(ValueError, match="img_emb must be"):
        h.sims(img[:, :10], cap, lens)
    with pytest.raises(ValueError, match="cap_emb must be"):
        h.sims(img, cap[..., :5], lens)
    with pytest.raises(TypeError, match="same dtype"):
        h.sims(img, cap.float(), lens)
    with pytest.raises(ValueError, match="cap_lens"):
        h.sims(img, cap, [3, 4])
    with pytest.raises(ValueError, match="block_rows"):
        h.sims(img, cap, lens, block_rows=0)
    with pytest.raises(TypeError, match="dtype"):
        h.sims(img, cap, lens, dtype=torch.int32)
    with pytest.raises(ValueError, match="levels"):
        TSHSRSimilarity(D, S, levels=("global",))
    with pytest.raises(ValueError, match="streams"):
        TSHSRSimilarity(D, S, streams=())
    with pytest.raises(ValueError, match="TSHSREnsemble needs"):
        TSHSREnsemble([])
    with pytest.raises(TypeError, match="expected TSHSR"):
        TSHSREnsemble([h])


# ------------------------------------------------------------------------------------------------------------------
# evaluation plumbing: similarity_matrix, streaming top-k, ensemble
# ------------------------------------------------------------------------------------------------------------------

def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = TSHSRConfig(vocab_size=30, word_dim=6, embed_size=D, sim_dim=S, img_dim=12, sgr_step=2, **kw)
    return TSHSR(cfg).eval()


def tiny_split(n_img=3, seed=0):
    rng = np.random.default_rng(seed)
    captions = [rng.integers(1, 30, size=int(rng.integers(1, 9))) for _ in range(5 * n_img)]
    return SimpleNamespace(images=rng.random((n_img, K, 12), dtype=np.float32), im_div=5, captions=captions)


def test_similarity_matrix_equals_the_per_pair_loop():
    model, split = tiny_model(), tiny_split()
    got = similarity_matrix(model, split, caption_chunk=4, device="cpu", progress=False)
    lens = torch.tensor([len(c) for c in split.captions])
    ids = torch.zeros(len(lens), int(lens.max()), dtype=torch.long)
    for j, c in enumerate(split.captions):
        ids[j, :len(c)] = torch.as_tensor(c)
    with torch.no_grad():
        img = model.encode_images(torch.from_numpy(split.images))
        cap = model.encode_captions(ids, lens)
    expected = per_pair_sims(model.sim_enc, img, cap, lens)
    assert got.shape == (3, 15)
    assert_close_report(torch.from_numpy(got), expected, atol=2e-6, rtol=0, what="similarity_matrix")


def test_streaming_topk_matches_the_matrix():
    model = tiny_model(1)
    img, cap, lens = features(5, [4, 1, 7, 3, 2, 6, 5], dtype=torch.float32)
    full = model.sims(img, cap, lens)
    vals, inds = similarity_topk(model, img, cap, lens, 3, img_chunk=2, cap_chunk=3)
    ref_v, _ = full.double().topk(3, dim=1)
    assert_close_report(vals, ref_v, atol=0, rtol=0, what="top-k values")
    assert torch.equal(full.double().gather(1, inds), vals)


def test_ensemble_is_the_mean_of_its_members():
    a, b = tiny_model(2), tiny_model(3, streams=("t2i",), fusion="learned")
    ens = TSHSREnsemble([a, b])
    img, cap, lens = features(2, [3, 5], dtype=torch.float32)
    got = ens.sims([img, img], [cap, cap], lens)
    assert_close_report(got, (a.sims(img, cap, lens) + b.sims(img, cap, lens)) / 2, atol=1e-7, rtol=0,
                        what="ensemble")
    with pytest.raises(ValueError, match="one embedding tensor per member"):
        ens.sims(img, cap, lens)
