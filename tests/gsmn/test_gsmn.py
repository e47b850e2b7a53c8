"""GSMN head, geometry and model: the official goldens (``gsmn.npz``: every score array, the fed boxes bit for bit,
the kernel densities, the sparse adjacency), the paper's propagation against a slow per-pair restatement of the
formula, what the parse and the boxes change (and do not), bad input, the model (training step, ensemble, official
checkpoint) and the blocked all-pairs evaluation."""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

import itm_models
from itm_kernels.node_match import node_match_reference
from itm_models.checkpoints import CheckpointError
from itm_models.gsmn import GSMN, GSMNEnsemble, GSMNSimilarity, normalize_boxes, official_eval_boxes, parse_captions
from itm_models.gsmn.geometry import official_division_counts, sparse_adjacency
from itm_models.baselines.gsmn import official_style_sims
from conftest import assert_close_report, golden_path

pytestmark = pytest.mark.usefixtures("one_thread")

STATES = {"dense": "gsmn_dense_state.pt", "sparse": "gsmn_sparse_state.pt"}


def assert_golden(got: torch.Tensor, expected, what: str, rel: float = 1e-6):
    """|got - expected| <= rel * max(1, |expected|) elementwise (the issue's tolerance), with a self-explaining
    report on failure."""
    expected = torch.as_tensor(expected).double()
    got = got.detach().double()
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    tol = rel * expected.abs().clamp(min=1.0)
    if not ((got - expected).abs() <= tol).all():
        assert_close_report(got, expected, atol=rel, rtol=rel, what=what)        # the report (stricter bound above)
        raise AssertionError(f"{what}: max |diff| {(got - expected).abs().max().item():.3e} above "
                             f"{rel} * max(1, |value|)")


# ------------------------------------------------------------------------------------------------------------------
# Goldens
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden():
    g = np.load(golden_path("gsmn.npz"), allow_pickle=False)
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def golden_parses(golden):
    return [golden["parses"][c, :golden["parse_n_edges"][c]] for c in range(len(golden["cap_lens"]))]


def golden_head(state: str, variant: str, propagate: bool = False) -> GSMNSimilarity:
    head = GSMNSimilarity(variant, 20.0, propagate)
    head.load_official_state(torch.load(golden_path(STATES[state]), weights_only=True))
    return head.eval()


# (score array, weights, variant, fed boxes: a boxes_fed_* array, or None = pixel boxes normalised by image_sizes)
SCORE_CASES = [
    ("dense_official", "dense", "dense", "boxes_fed_official"),
    ("sparse_official", "sparse", "sparse", "boxes_fed_official"),
    ("dense_official_fold5", "dense", "dense", "boxes_fed_official_fold5"),
    ("sparse_official_fold5", "sparse", "sparse", "boxes_fed_official_fold5"),
    ("dense_official_f64boxfile", "dense", "dense", "boxes_fed_official_f64boxfile"),
    ("sparse_official_f64boxfile", "sparse", "sparse", "boxes_fed_official_f64boxfile"),
    ("dense_corrected_boxes", "dense", "dense", None),
    ("sparse_corrected_boxes", "sparse", "sparse", None),
    ("sparse_graph_on_dense_state", "dense", "sparse", "boxes_fed_official"),
    ("dense_graph_on_sparse_state", "sparse", "dense", "boxes_fed_official"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name, state, variant, fed", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_golden_scores(golden, golden_parses, name, state, variant, fed, dtype):
    """Every official score matrix from the official state_dicts and the fed boxes, float32 and float64 inputs."""
    head = golden_head(state, variant)
    img = torch.from_numpy(golden["img"]).to(dtype)
    cap = torch.from_numpy(golden["cap"]).to(dtype)                     # garbage padding: never read
    lens = torch.from_numpy(golden["cap_lens"])
    if fed is None:
        kwargs = dict(boxes=torch.from_numpy(golden["boxes"]), image_sizes=golden["image_sizes"])
    else:
        kwargs = dict(boxes=torch.from_numpy(golden[fed]))
    vis, txt = head.sims(img, cap, lens, parses=golden_parses, return_parts=True, **kwargs)
    assert vis.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and vis.shape == (12, 60)
    assert_golden(vis + txt, golden[name], f"{name} ({dtype})")
    assert torch.equal(vis + txt, head.sims(img, cap, lens, parses=golden_parses, **kwargs))
    if name in ("dense_official", "sparse_official"):
        assert_golden(vis, golden[f"{variant}_official_visual_part"], f"{variant} visual part ({dtype})")
        assert_golden(txt, golden[f"{variant}_official_textual_part"], f"{variant} textual part ({dtype})")
    if fed is None:      # the same, fed the golden's corrected boxes as already normalised
        again = head.sims(img, cap, lens, torch.from_numpy(golden["boxes_fed_corrected"]), parses=golden_parses)
        assert_golden(again, golden[name], f"{name}, boxes_fed_corrected ({dtype})")


@pytest.mark.parametrize("fed, kwargs", [
    ("boxes_fed_official", {}),
    ("boxes_fed_official_fold5", {"fold5": True}),
    ("boxes_fed_official_f64boxfile", {"box_dtype": "float64"}),
])
def test_golden_official_eval_boxes_bit_exact(golden, fed, kwargs):
    """official_eval_boxes reproduces the boxes the released evaluation fed (F30K batch size 64), bit for bit; the
    division counts and source images are those of the golden."""
    pixels = golden["boxes"]
    if kwargs.get("box_dtype") == "float64":          # the float64 box file holds the same values
        for source in (pixels, pixels.astype(np.float64)):
            got = official_eval_boxes(source, golden["image_sizes"], batch_size=64, **kwargs)
            assert got.dtype == torch.float32
            assert np.array_equal(got.numpy(), golden[fed]), f"{fed} from {source.dtype} boxes"
    got = official_eval_boxes(torch.from_numpy(pixels), golden["image_sizes"], batch_size=64, **kwargs)
    assert got.dtype == torch.float32 and got.shape == (12, 36, 4)
    mismatch = np.argwhere(got.numpy().view(np.int32) != golden[fed].view(np.int32))
    assert mismatch.size == 0, f"{fed}: {len(mismatch)} bit mismatches, first {mismatch[:5].tolist()}"
    # the rule: row k = caption k (non-fold5) or 5k (fold5); image row // 5, that caption's division count
    rows = np.arange(12) * (5 if kwargs.get("fold5") else 1)
    counts = official_division_counts(60, batch_size=64, box_dtype=kwargs.get("box_dtype", "float32"))
    assert np.array_equal(counts[rows], golden[f"{fed}_divisions"])
    assert np.array_equal(rows // 5, golden[f"{fed}_src_image"])
    # structured image-size array (the loader's layout) gives the same bits
    sizes = np.zeros(12, dtype=[("image_w", np.int64), ("image_h", np.int64)])
    sizes["image_w"], sizes["image_h"] = golden["image_sizes"][:, 0], golden["image_sizes"][:, 1]
    assert np.array_equal(official_eval_boxes(pixels, sizes, **kwargs).numpy(), golden[fed])


def test_official_division_counts_rule():
    """float32 file: 5 + min(5, e - 5k) with e the end of the batch; float64 file: 6 + c mod 5 (golden README)."""
    assert (official_division_counts(60, batch_size=64) == 10).all()
    c32 = official_division_counts(60, batch_size=32)
    assert c32[30] == c32[31] == 7 and (c32[32:35] == 10).all() and (c32[25:30] == 10).all()
    assert (c32[np.r_[0:30, 32:60]] == 10).all()
    assert np.array_equal(official_division_counts(10, box_dtype="float64"), [6, 7, 8, 9, 10] * 2)
    # batches of 3 over 7 captions end at 3, 6, 7: image 0 has had 3 second-pass fetches when batch 0 is stacked,
    # all 5 for batch 1; image 1 has had 1, then 2 (the last, short batch)
    assert np.array_equal(official_division_counts(7, batch_size=3), [8, 8, 8, 10, 10, 6, 7])
    with pytest.raises(ValueError, match="box_dtype"):
        official_division_counts(5, box_dtype="float16")
    with pytest.raises(ValueError, match="batch_size"):
        official_division_counts(5, batch_size=0)


def test_golden_corrected_boxes_and_geometry(golden):
    """normalize_boxes = boxes_fed_corrected bit for bit (never in place); kernel densities s_ik from
    VisualGraphConvolution.kernel_weights within the golden's float32 summation noise (1.4e-5)."""
    pixels = torch.from_numpy(golden["boxes"])
    before = pixels.clone()
    got = normalize_boxes(pixels, golden["image_sizes"])
    assert torch.equal(pixels, before), "normalize_boxes changed its input"
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy().view(np.int32), golden["boxes_fed_corrected"].view(np.int32))
    assert np.array_equal(normalize_boxes(pixels, torch.from_numpy(golden["image_sizes"])).numpy(),
                          golden["boxes_fed_corrected"])
    for state in STATES:
        conv = golden_head(state, state).i2t_match_G.graph_convolution_1
        for which, fed in (("official", "boxes_fed_official"), ("corrected", "boxes_fed_corrected")):
            with torch.no_grad():
                w = conv.kernel_weights(torch.from_numpy(golden[fed]))
            assert w.shape == (12, 36, 36, 8) and w.dtype == torch.float32
            assert_close_report(w.sum(-1), torch.ones(12, 36, 36), atol=1e-6, rtol=0, what="kernel normalisation")
            assert_close_report(w.sum(2), torch.from_numpy(golden[f"{state}_vis_density_{which}"]), atol=2e-5,
                                rtol=0, what=f"{state} densities, {which} boxes")


def test_golden_parses_and_sparse_adjacency(golden, golden_parses):
    """The golden's JSON parses are its parse arrays; sparse_adjacency = the official build_sparse_graph (edges
    touching an index >= L dropped: captions 28 and 48) for every caption."""
    from_json = json.loads(str(golden["parses_json"]))
    assert len(from_json) == 60
    for c, edges in enumerate(from_json):
        assert np.array_equal(np.asarray(edges), golden_parses[c]), c
    for c, n in enumerate(golden["cap_lens"].tolist()):
        adj = sparse_adjacency(golden_parses[c], n)
        assert adj.dtype == np.float32 and adj.shape == (n, n)
        assert np.array_equal(adj, golden["sparse_adj"][c, :n, :n]), f"caption {c}"
        assert not golden["sparse_adj"][c, n:].any() and not golden["sparse_adj"][c, :, n:].any()
    for c in (28, 48):
        assert golden_parses[c].max() == golden["cap_lens"][c]


def test_golden_json_parses_as_input(golden):
    """The parses as the official caps.json holds them (lists of lists) are accepted as they are."""
    head = golden_head("sparse", "sparse")
    got = head.sims(torch.from_numpy(golden["img"]), torch.from_numpy(golden["cap"]),
                    torch.from_numpy(golden["cap_lens"]), torch.from_numpy(golden["boxes_fed_official"]),
                    parses=json.loads(str(golden["parses_json"])))
    assert_golden(got, golden["sparse_official"], "sparse, JSON parses")


@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_golden_official_style_loop(golden, golden_parses, variant):
    """The official-style per-caption loop (the benchmark baseline) reproduces the goldens too."""
    head = golden_head(variant, variant)
    img, cap = torch.from_numpy(golden["img"]), torch.from_numpy(golden["cap"])
    lens = torch.from_numpy(golden["cap_lens"])
    got = official_style_sims(head, img, cap, lens, torch.from_numpy(golden["boxes_fed_official"]),
                              parses=golden_parses)
    assert_golden(got, golden[f"{variant}_official"], f"{variant} official-style loop")
    got = official_style_sims(head, img, cap, lens, torch.from_numpy(golden["boxes"]),
                              image_sizes=golden["image_sizes"], parses=golden_parses)
    assert_golden(got, golden[f"{variant}_corrected_boxes"], f"{variant} official-style loop, corrected boxes")
    with pytest.raises(ValueError, match="propagate"):
        official_style_sims(golden_head(variant, variant, propagate=True), img, cap, lens,
                            torch.from_numpy(golden["boxes_fed_official"]), parses=golden_parses)


# ------------------------------------------------------------------------------------------------------------------
# A slow, obvious restatement of both modes (float64, per pair)
# ------------------------------------------------------------------------------------------------------------------

def _weight_norm(layer) -> torch.Tensor:
    return layer.weight_g * layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)


def _mlp(graph, h: torch.Tensor) -> float:
    """out_2(tanh(out_1(h))) with weight = g v / |v| per output row."""
    hidden = torch.tanh(_weight_norm(graph.out_1) @ h + graph.out_1.bias)
    return float(_weight_norm(graph.out_2) @ hidden + graph.out_2.bias)


def _visual_kernels(conv, boxes: torch.Tensor) -> torch.Tensor:
    """w_k(r, j) for one image's normalised boxes (K, 4): Gaussians over the polar coordinates of the box centres,
    normalised over the kernels. Scalar loops."""
    K, n_k = boxes.shape[0], conv.mean_rho.shape[0]
    mr, mt = conv.mean_rho.reshape(-1).tolist(), conv.mean_theta.reshape(-1).tolist()
    pr, pt = conv.precision_rho.reshape(-1).tolist(), conv.precision_theta.reshape(-1).tolist()
    b = boxes.tolist()
    w = torch.zeros(K, K, n_k, dtype=torch.float64)
    for r in range(K):
        for j in range(K):
            dx = (b[r][0] + b[r][2]) / 2 - (b[j][0] + b[j][2]) / 2
            dy = (b[r][1] + b[r][3]) / 2 - (b[j][1] + b[j][3]) / 2
            rho, theta = math.hypot(dx, dy), math.atan2(dx, dy)
            raw = []
            for k in range(n_k):
                angle = abs(theta - mt[k])
                angle = min(angle, abs(2 * math.pi - angle))
                raw.append(math.exp(-0.5 * (rho - mr[k]) ** 2 / pr[k] ** 2) *
                           math.exp(-0.5 * angle ** 2 / pt[k] ** 2))
            w[r, j] = torch.tensor(raw, dtype=torch.float64) / sum(raw)
    return w


def _textual_kernels(conv, words: torch.Tensor, lam: float, parse) -> torch.Tensor:
    """w_k(t, t') for one caption's words (n, d): A = softmax(lam e e^T) (dense) or l2norm(adj * A) (sparse, adj
    from the parse: ROOT edge and indices >= n skipped, symmetric, self loops); w_k = A p_k / sum_t' A p_k."""
    n = words.shape[0]
    A = torch.softmax(lam * words @ words.t(), dim=1)
    if parse is not None:
        adj = torch.eye(n, dtype=torch.float64)
        for g, d in list(parse)[1:]:
            if g < n and d < n:
                adj[g, d] = adj[d, g] = 1.0
        A = adj * A
        A = A / (A.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
    p = conv.params.reshape(-1)
    w = torch.zeros(n, n, len(p), dtype=torch.float64)
    for t in range(n):
        for k in range(len(p)):
            w[t, :, k] = A[t] * p[k] / (A[t] * p[k]).sum()
    return w


@torch.no_grad()
def slow_reference(head: GSMNSimilarity, img, cap, lens, boxes, parses, propagate: bool) -> torch.Tensor:
    """Per pair: matching vectors from node_match_reference; visual h_r = concat_k W_k sum_j w_k(r, j) x_j; textual
    h_t = concat_k (W_k sum_t' w_k(t, t') x_t' + b_k); x_j = m_j (paper) or the node's own m_r (released); score =
    mean_r MLP(h_r) + mean_t MLP(h_t)."""
    region, word = node_match_reference(img, cap, lens, lambda_softmax=head.lambda_softmax,
                                        num_blocks=head.num_block)
    vg, tg = head.i2t_match_G, head.t2i_match_G
    vconv, tconv = vg.graph_convolution_1, tg.graph_convolution_3
    n_img, n_cap, K = img.shape[0], cap.shape[0], img.shape[1]
    vis_w = [_visual_kernels(vconv, boxes[i]) for i in range(n_img)]
    txt_w = [_textual_kernels(tconv, cap[c, :int(lens[c])], head.lambda_softmax,
                              parses[c] if head.variant == "sparse" else None) for c in range(n_cap)]
    out = torch.zeros(n_img, n_cap, dtype=torch.float64)
    for i in range(n_img):
        for c in range(n_cap):
            n = int(lens[c])
            vis = 0.0
            for r in range(K):
                parts = []
                for k, lin in enumerate(vconv.conv_weights):
                    agg = sum(vis_w[i][r, j, k] * (region[i, c, j] if propagate else region[i, c, r])
                              for j in range(K))
                    parts.append(lin.weight @ agg)
                vis += _mlp(vg, torch.cat(parts))
            txt = 0.0
            for t in range(n):
                parts = []
                for k, lin in enumerate(tconv.conv_weights):
                    agg = sum(txt_w[c][t, u, k] * (word[i, c, u] if propagate else word[i, c, t]) for u in range(n))
                    parts.append(lin.weight @ agg + lin.bias)
                txt += _mlp(tg, torch.cat(parts))
            out[i, c] = vis / K + txt / n
    return out


def random_head(variant: str, propagate: bool, seed: int, *, d: int = 64, lam: float = 20.0) -> GSMNSimilarity:
    """Official-style init, then every parameter perturbed (as the goldens' states), so that ignoring any fails."""
    torch.manual_seed(seed)
    head = GSMNSimilarity(variant, lam, propagate, embed_size=d).double()
    g = torch.Generator().manual_seed(seed + 1)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    with torch.no_grad():
        vc, tc = head.i2t_match_G.graph_convolution_1, head.t2i_match_G.graph_convolution_3
        vc.mean_rho.copy_(rand(8, 1) * 0.8)
        vc.mean_theta.copy_(rand(8, 1) * 2 * math.pi - math.pi)
        vc.precision_rho.copy_(0.3 + 0.5 * rand(8, 1))
        vc.precision_theta.copy_(0.4 + 0.6 * rand(8, 1))
        tc.params.copy_((0.3 + 0.7 * rand(8, 1)) * torch.where(rand(8, 1) < 0.5, -1.0, 1.0))
        for conv in (*vc.conv_weights, *tc.conv_weights):
            conv.weight.copy_(rand(*conv.weight.shape) - 0.5)
            if conv.bias is not None:
                conv.bias.copy_(rand(*conv.bias.shape) * 0.2 - 0.1)
        for graph in (head.i2t_match_G, head.t2i_match_G):
            for lin in (graph.out_1, graph.out_2):
                lin.bias.add_(rand(*lin.bias.shape) * 0.2 - 0.1)
                lin.weight_g.mul_(0.5 + rand(*lin.weight_g.shape))
    return head.eval()


def random_inputs(seed: int, *, n_img: int = 3, n_cap: int = 4, K: int = 6, L: int = 7, d: int = 64,
                  lens=(7, 1, 4, 2), dtype=torch.float64):
    """Regions, words correlated with them, garbage padding, normalised boxes (two regions sharing a centre), and
    one parse per caption (trees; caption 2 has an edge to index L_c, which is dropped)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=-1)
    lens = torch.tensor(lens[:n_cap])
    noise = torch.randn(n_cap, L, d, generator=g, dtype=torch.float64)
    idx = torch.randint(0, K, (n_cap, L), generator=g)
    cap = torch.nn.functional.normalize(0.6 * img[torch.arange(n_cap)[:, None] % n_img, idx] +
                                        0.8 * torch.nn.functional.normalize(noise, dim=-1), dim=-1)
    cap[torch.arange(L)[None, :] >= lens[:, None]] = 7.5
    xy = torch.rand(n_img, K, 2, generator=g, dtype=torch.float64) * 0.6
    wh = 0.05 + torch.rand(n_img, K, 2, generator=g, dtype=torch.float64) * 0.35
    boxes = torch.cat([xy, xy + wh], dim=-1)
    boxes[:, -1] = boxes[:, -2]
    base = [[[0, 3], [3, 1], [3, 2], [2, 4], [4, 5], [3, 6]], [[0, 1]], [[0, 2], [2, 1], [2, 3], [3, 4]],
            [[0, 1], [1, 2]]]
    parses = [base[c % 4] for c in range(n_cap)]
    return img.to(dtype), cap.to(dtype), lens, boxes, parses


@pytest.mark.parametrize("variant, propagate, lam", [("dense", True, 20.0), ("sparse", True, 20.0),
                                                     ("dense", True, 2.0), ("sparse", True, 2.0),
                                                     ("dense", False, 20.0), ("sparse", False, 10.0)])
def test_against_slow_reference(variant, propagate, lam):
    """The head (sims in blocks, and forward) against the per-pair formula, float64, 1e-10. With lambda 20 the
    word affinities of these random captions are nearly diagonal; lambda 2 spreads them over the neighbours, so the
    textual propagation is exercised for real."""
    head = random_head(variant, propagate, 11, lam=lam)
    img, cap, lens, boxes, parses = random_inputs(12)
    expected = slow_reference(head, img, cap, lens, boxes, parses, propagate)
    what = f"{variant} propagate={propagate} lambda={lam}"
    assert_close_report(head.sims(img, cap, lens, boxes, parses=parses), expected, atol=1e-10, rtol=0, what=what)
    assert_close_report(head.sims(img, cap, lens, boxes, parses=parses, block_pairs=1), expected, atol=1e-10,
                        rtol=0, what=what + " block_pairs=1")
    with torch.no_grad():
        assert_close_report(head(img, cap, lens, boxes, parses=parses), expected, atol=1e-10, rtol=0,
                            what=what + " forward")
    # pixel boxes with image sizes: normalised once, each image by its own size
    sizes = torch.tensor([[640, 480], [333, 500], [800, 601]])[:img.shape[0]]
    pixels = boxes * sizes.double().repeat(1, 2)[:, None, :]
    assert_close_report(head.sims(img, cap, lens, pixels, image_sizes=sizes, parses=parses), expected, atol=1e-10,
                        rtol=0, what=what + " pixel boxes")


def test_slow_reference_detects_slips():
    """Sanity of the restatement's oracle role (lambda 2): paper and released modes differ, as do the two textual
    graphs."""
    img, cap, lens, boxes, parses = random_inputs(3)
    dense = random_head("dense", True, 5, lam=2.0)
    sparse = random_head("sparse", True, 5, lam=2.0)
    a = slow_reference(dense, img, cap, lens, boxes, parses, True)
    assert (a - slow_reference(dense, img, cap, lens, boxes, parses, False)).abs().max() > 1e-3
    assert (a - slow_reference(sparse, img, cap, lens, boxes, parses, True)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------------------
# What the parse and the boxes change
# ------------------------------------------------------------------------------------------------------------------

def alternative_parses(lens, kind: str):
    out = []
    for n in lens:
        tokens = list(range(1, max(n - 1, 1)))          # rows 1..L-2 (row 0 <start>, row L-1 <end>)
        root = [[0, tokens[0]]]
        if kind == "chain":
            out.append(root + [[t, t + 1] for t in tokens[:-1]])
        elif kind == "star":
            out.append(root + [[tokens[0], t] for t in tokens[1:]])
        elif kind == "root_only":
            out.append(root)
        elif kind == "all_pairs":
            out.append(root + [[a, b] for a in tokens for b in tokens if a < b])
        else:
            raise AssertionError(kind)
    return out


class ExplodingParses(Sequence):
    """Any read fails: proves the dense graph never looks at the parses."""

    def __len__(self):
        raise AssertionError("the dense head read the parses")

    def __getitem__(self, i):
        raise AssertionError("the dense head read the parses")


@pytest.fixture(scope="module")
def golden_tensors(golden):
    return (torch.from_numpy(golden["img"]), torch.from_numpy(golden["cap"]), torch.from_numpy(golden["cap_lens"]),
            torch.from_numpy(golden["boxes_fed_official"]), torch.from_numpy(golden["boxes_fed_corrected"]))


def test_released_parse_has_no_effect_boxes_do(golden, golden_parses, golden_tensors):
    img, cap, lens, boxes, corrected = golden_tensors
    sparse = golden_head("sparse", "sparse")
    base = sparse.sims(img, cap, lens, boxes, parses=golden_parses)
    for kind in ("chain", "star", "root_only", "all_pairs"):
        other = sparse.sims(img, cap, lens, boxes, parses=alternative_parses(lens.tolist(), kind))
        assert_close_report(other, base, atol=1e-6, rtol=0, what=f"released sparse, {kind} parses")
    other = sparse.sims(img, cap, lens, boxes, parses=[[[0, 0]]] * 60)
    assert_close_report(other, base, atol=1e-6, rtol=0, what="released sparse, [[0, 0]] parses")
    dense = golden_head("dense", "dense")
    d0 = dense.sims(img, cap, lens, boxes)
    assert torch.equal(d0, dense.sims(img, cap, lens, boxes, parses=ExplodingParses()))
    assert torch.equal(d0, dense.sims(img, cap, lens, boxes, parses=golden_parses))
    # dense and sparse graphs compute the same function on the same weights (released code)
    assert_close_report(golden_head("dense", "sparse").sims(img, cap, lens, boxes, parses=golden_parses), d0,
                        atol=1e-6, rtol=0, what="sparse graph on the dense state")
    assert_close_report(golden_head("sparse", "dense").sims(img, cap, lens, boxes), base, atol=1e-6, rtol=0,
                        what="dense graph on the sparse state")
    # the boxes do change the scores
    for head, ref in ((dense, d0), (sparse, base)):
        assert (head.sims(img, cap, lens, corrected, parses=golden_parses) - ref).abs().max() > 1e-2


def correlated_captions(cap, lens, spread: float = 0.3):
    """Each caption's words pulled towards their mean (word cosines about 0.94, as contextual GRU states are):
    the golden's words are nearly orthogonal, so at lambda 20 their affinity softmax is the identity up to ~1e-6
    and no graph, dense or parsed, can move anything between words."""
    valid = (torch.arange(cap.shape[1])[None, :] < lens[:, None])[..., None]
    mean = torch.nn.functional.normalize((cap * valid).sum(1, keepdim=True), dim=-1)
    return torch.where(valid, torch.nn.functional.normalize(mean + spread * cap, dim=-1), cap)


def test_paper_mode_parse_and_boxes_matter(golden, golden_parses, golden_tensors):
    img, cap, lens, boxes, corrected = golden_tensors
    cap = correlated_captions(cap, lens)
    sparse = golden_head("sparse", "sparse", propagate=True)
    released = golden_head("sparse", "sparse")
    base = sparse.sims(img, cap, lens, boxes, parses=golden_parses)
    released_base = released.sims(img, cap, lens, boxes, parses=golden_parses)
    assert torch.isfinite(base).all()
    for kind in ("chain", "star", "root_only", "all_pairs"):
        parses = alternative_parses(lens.tolist(), kind)
        other = sparse.sims(img, cap, lens, boxes, parses=parses)
        assert (other - base).abs().max() > 1e-4, f"paper mode: the {kind} parse changed nothing"
        assert_close_report(released.sims(img, cap, lens, boxes, parses=parses), released_base, atol=1e-6, rtol=0,
                            what=f"released mode, correlated words, {kind} parses")
    assert (sparse.sims(img, cap, lens, corrected, parses=golden_parses) - base).abs().max() > 1e-4
    dense = golden_head("dense", "dense", propagate=True)
    d0 = dense.sims(img, cap, lens, boxes)
    assert (dense.sims(img, cap, lens, corrected) - d0).abs().max() > 1e-4
    # paper and released modes differ, and the dense and sparse graphs differ in paper mode
    assert (d0 - golden_head("dense", "dense").sims(img, cap, lens, boxes)).abs().max() > 1e-4
    dense_as_sparse = golden_head("dense", "sparse", propagate=True)
    assert (dense_as_sparse.sims(img, cap, lens, boxes, parses=golden_parses) - d0).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture()
def small():
    head = random_head("sparse", False, 1)
    img, cap, lens, boxes, parses = random_inputs(2)
    return head, img, cap, lens, boxes, parses


def test_bad_boxes(small):
    head, img, cap, lens, boxes, parses = small
    for bad in (boxes[:, :5], boxes[..., :3], boxes[0], boxes[:2]):
        with pytest.raises(ValueError, match=r"boxes must have shape \(N_img, K, 4\) = \(3, 6, 4\)"):
            head.sims(img, cap, lens, bad, parses=parses)
    with pytest.raises(TypeError, match="boxes must be"):
        head.sims(img, cap, lens, boxes.tolist(), parses=parses)
    flipped = boxes.clone()
    flipped[1, 2, 2] = flipped[1, 2, 0] - 0.01
    with pytest.raises(ValueError, match=r"x2 >= x1.*boxes\[1, 2\]"):
        head.sims(img, cap, lens, flipped, parses=parses)
    flipped = boxes.clone()
    flipped[2, 0, 3] = flipped[2, 0, 1] - 0.01
    with pytest.raises(ValueError, match=r"y2 >= y1.*boxes\[2, 0\]"):
        head(img, cap, lens, flipped, parses=parses)
    for value in (float("nan"), float("inf")):
        broken = boxes.clone()
        broken[0, 1, 1] = value
        with pytest.raises(ValueError, match="boxes must be finite"):
            head.sims(img, cap, lens, broken, parses=parses)
    # official_eval_boxes checks the pixel boxes too
    sizes = [[640, 480]] * 3
    with pytest.raises(ValueError, match="boxes must be finite"):
        official_eval_boxes(broken.numpy(), sizes)
    with pytest.raises(ValueError, match="x2 >= x1"):
        official_eval_boxes(torch.flip(boxes, dims=[-1]), sizes)
    with pytest.raises(ValueError, match=r"boxes must have shape \(N_img, K, 4\)"):
        official_eval_boxes(boxes[..., :3], sizes)


def test_bad_image_sizes(small):
    head, img, cap, lens, boxes, parses = small
    for bad in ([[640, 480], [0, 480], [10, 10]], [[640, 480], [100, -1], [10, 10]],
                [[640, float("nan")], [1, 1], [1, 1]]):
        with pytest.raises(ValueError, match=r"image_sizes must be finite and > 0"):
            head.sims(img, cap, lens, boxes, image_sizes=bad, parses=parses)
    for bad in ([[640, 480]] * 2, [[640, 480, 3]] * 3, [640, 480, 3]):
        with pytest.raises(ValueError, match=r"image_sizes must have shape \(N_img, 2\) = \(3, 2\)"):
            head.sims(img, cap, lens, boxes, image_sizes=bad, parses=parses)
    for bad in ("640x480", [[640, 480], [1, None], [1, 1]]):
        with pytest.raises(TypeError, match="image_sizes must be numeric"):
            head.sims(img, cap, lens, boxes, image_sizes=bad, parses=parses)
    with pytest.raises(ValueError, match="image_sizes"):
        official_eval_boxes(boxes, [[640, 480], [0, 480], [10, 10]])
    with pytest.raises(ValueError, match="image_sizes"):
        normalize_boxes(boxes, [[640, 480]])


def test_bad_parses(small):
    head, img, cap, lens, boxes, parses = small                    # lens (7, 1, 4, 2)
    cases = [
        ([parses[0], [[0, 1], [-1, 1]], parses[2], parses[3]], r"parses\[1\] has token indices in -1\.\.1, outside "
                                                               r"0\.\.1"),
        ([parses[0], parses[1], [[0, 2], [2, 5]], parses[3]], r"parses\[2\] has token indices in 0\.\.5, outside "
                                                              r"0\.\.4 \(caption length 4\)"),
        (parses[:3], r"parses must hold one edge list per caption \(4\), got 3"),
        (parses + [parses[0]], r"parses must hold one edge list per caption \(4\), got 5"),
        ([parses[0], parses[1], [[0, 1, 2]], parses[3]], r"parses\[2\] must be a list of integer"),
        ([parses[0], parses[1], [[0, 1], [1]], parses[3]], r"parses\[2\] must be a list of integer"),
        ([parses[0], [[0, 0.5]], parses[2], parses[3]], r"parses\[1\] must be a list of integer"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            head.sims(img, cap, lens, boxes, parses=bad)
    with pytest.raises(ValueError, match="the sparse GSMN needs parses"):
        head.sims(img, cap, lens, boxes)
    with pytest.raises(ValueError, match="the sparse GSMN needs parses"):
        head(img, cap, lens, boxes)
    for bad in ("0,1", {0: [[0, 1]]}):
        with pytest.raises(TypeError, match="parses must be a sequence"):
            head.sims(img, cap, lens, boxes, parses=bad)
    # accepted: index L_c (dropped, as the released code does), empty lists, numpy edge arrays
    ok = [parses[0], [[0, 1]], [[0, 2], [2, 4]], np.array([[0, 1], [1, 2]])]
    head.sims(img, cap, lens, boxes, parses=ok)
    head.sims(img, cap, lens, boxes, parses=[[], [], [], []])


def test_bad_construction_state_and_mode(small):
    head, img, cap, lens, boxes, parses = small
    with pytest.raises(ValueError, match="variant must be one of"):
        GSMNSimilarity("full")
    with pytest.raises(ValueError, match="lambda_softmax"):
        GSMNSimilarity("dense", float("nan"))
    with pytest.raises(ValueError, match="num_block"):
        GSMNSimilarity("dense", embed_size=1000)
    with pytest.raises(ValueError, match="embed_size = 64"):
        head.sims(img[..., :32].contiguous(), cap[..., :32].contiguous(), lens, boxes, parses=parses)
    with pytest.raises(ValueError, match="embed_size = 64"):
        head(img[..., :32].contiguous(), cap[..., :32].contiguous(), lens, boxes, parses=parses)
    with pytest.raises(ValueError, match="cap_lens"):
        head.sims(img, cap, lens[:3], boxes, parses=parses)
    head.train()
    with pytest.raises(RuntimeError, match=r"eval mode.*\.eval\(\)"):
        head.sims(img, cap, lens, boxes, parses=parses)
    head.eval()
    state = {"i2t_match_G": head.i2t_match_G.state_dict(), "t2i_match_G": head.t2i_match_G.state_dict()}
    fresh = GSMNSimilarity("sparse", embed_size=64).double()
    fresh.load_official_state(state)
    assert torch.equal(fresh.eval().sims(img, cap, lens, boxes, parses=parses),
                       head.sims(img, cap, lens, boxes, parses=parses))
    no_bias = dict(state, t2i_match_G={k: v for k, v in state["t2i_match_G"].items()
                                       if not (k.startswith("graph_convolution_3.conv_weights") and
                                               k.endswith(".bias"))})
    with pytest.raises(ValueError, match=r"(?s)state\['t2i_match_G'\].*conv_weights\.0\.bias"):
        fresh.load_official_state(no_bias)
    extra = dict(state, i2t_match_G=dict(state["i2t_match_G"], **{"graph_convolution_1.extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"(?s)state\['i2t_match_G'\].*graph_convolution_1\.extra"):
        fresh.load_official_state(extra)
    shape = dict(state, i2t_match_G=dict(state["i2t_match_G"], **{"out_1.weight_v": torch.zeros(32, 31)}))
    with pytest.raises(ValueError, match=r"(?s)state\['i2t_match_G'\].*out_1\.weight_v"):
        fresh.load_official_state(shape)
    for bad in ({"i2t_match_G": state["i2t_match_G"]}, dict(state, sim_enc={}), [state]):
        with pytest.raises(ValueError, match="exactly 'i2t_match_G' and 't2i_match_G'"):
            fresh.load_official_state(bad)
    with pytest.raises(ValueError, match="GSMNEnsemble needs at least one GSMN model.*GSMNSimilarity"):
        GSMNEnsemble([head])
    with pytest.raises(ValueError, match="GSMNEnsemble needs at least one GSMN model"):
        GSMNEnsemble([])


def test_parse_captions_optional():
    try:
        import spacy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="parse_captions needs spaCy"):
            parse_captions(["a dog runs on the grass"])
        pytest.skip("spaCy not installed: only its clear ImportError is tested")
    try:
        parses = parse_captions(["a dog runs on the grass", "two men"])
    except ImportError as exc:
        assert "spacy download" in str(exc)
        pytest.skip(f"no spaCy English pipeline: {exc}")
    assert len(parses) == 2
    for edges, n in zip(parses, (6, 2)):
        assert edges[0][0] == 0 and len(edges) == n
        assert [d for _, d in edges[1:]] == sorted(d for _, d in edges[1:])
        assert sorted(d for _, d in edges) == list(range(1, n + 1))


# ------------------------------------------------------------------------------------------------------------------
# Model level
# ------------------------------------------------------------------------------------------------------------------

def tiny_model(variant: str, propagate: bool = False, seed: int = 0) -> GSMN:
    torch.manual_seed(seed)
    return GSMN(vocab_size=40, variant=variant, propagate=propagate, img_dim=24, word_dim=12, embed_size=64)


def tiny_batch(seed: int = 0, B: int = 4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 6, 24, generator=g)
    lens = torch.tensor([7, 5, 4, 2][:B])
    ids = torch.randint(1, 40, (B, 7), generator=g)
    ids[torch.arange(7)[None, :] >= lens[:, None]] = 0
    xy = torch.rand(B, 6, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 20 + torch.rand(B, 6, 2, generator=g) * 200], dim=-1)
    sizes = torch.tensor([[640, 480], [500, 600], [520, 530], [800, 600]][:B])
    parses = [[[0, 2], [2, 1], [2, 3], [3, 4], [4, 5], [2, 6]], [[0, 1], [1, 2], [1, 3]], [[0, 2], [2, 1]],
              [[0, 1]]][:B]
    return images, ids, lens, boxes, sizes, parses


@pytest.mark.parametrize("variant, propagate", [("dense", False), ("sparse", False), ("sparse", True)])
def test_model_training_step(variant, propagate):
    """GSMN forward on a batch is differentiable: the hinge loss gives finite gradients to the encoders and the
    head, non-zero wherever the score depends on the parameter (the textual p_k cancel in both modes and out_2's
    bias shifts every score alike, so theirs are rounding only / zero)."""
    model = tiny_model(variant, propagate).train()
    images, ids, lens, boxes, sizes, parses = tiny_batch()
    scores = model(images, ids, lens, boxes, sizes, parses)
    assert scores.shape == (4, 4) and torch.isfinite(scores).all()
    diag = scores.diag()[:, None]
    loss = (0.2 + scores - diag).clamp(min=0).fill_diagonal_(0).sum() + \
        (0.2 + scores - diag.t()).clamp(min=0).fill_diagonal_(0).sum()
    assert loss > 0
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("txt_enc.embed"):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad[ids[ids > 0]].abs().sum() > 0
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # p_k cancel in the textual kernel weights; out_2's bias adds the same constant to every score
        if name != "sim.t2i_match_G.graph_convolution_3.params" and not name.endswith("out_2.bias"):
            assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    # eval-mode forward = sims
    model.eval()
    with torch.no_grad():
        img_emb, cap_emb = model.encode_images(images), model.encode_captions(ids, lens)
        assert_close_report(model.sims(img_emb, cap_emb, lens, boxes, sizes, parses),
                            model(images, ids, lens, boxes, sizes, parses), atol=1e-6, rtol=0, what="eval forward")


def test_ensemble_is_mean_of_members():
    dense, sparse = tiny_model("dense", seed=1).eval(), tiny_model("sparse", seed=2).eval()
    ens = GSMNEnsemble([dense, sparse]).eval()
    images, ids, lens, boxes, sizes, parses = tiny_batch(3)
    with torch.no_grad():
        img_embs, cap_embs = ens.encode_images(images), ens.encode_captions(ids, lens)
        got = ens.sims(img_embs, cap_embs, lens, boxes, sizes, parses)
        members = [m.sims(v, e, lens, boxes, sizes, parses) for m, v, e in zip(ens.models, img_embs, cap_embs)]
    assert_close_report(got, (members[0] + members[1]) / 2, atol=1e-7, rtol=0, what="ensemble mean")
    with pytest.raises(ValueError, match="one image and one caption embedding per member"):
        ens.sims(img_embs[:1], cap_embs, lens, boxes, sizes, parses)


def _official_opt(is_sparse: bool) -> argparse.Namespace:
    return argparse.Namespace(
        data_path="data", data_name="f30k_precomp", vocab_path="vocab", margin=0.2, num_epochs=30, batch_size=64,
        word_dim=12, embed_size=64, grad_clip=2.0, num_layers=1, learning_rate=0.0002, lr_update=15, workers=10,
        log_step=10, val_step=500, logger_name="runs", model_name="runs", resume="", max_violation=True,
        img_dim=24, no_imgnorm=False, no_txtnorm=False, bi_gru=True, lambda_softmax=20.0, feat_dim=16,
        num_block=16, hid_dim=32, out_dim=1, is_sparse=is_sparse, vocab_size=40)


@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_official_checkpoint_round_trip(tmp_path, variant):
    model = tiny_model(variant, seed=4).eval()
    with torch.no_grad():                         # non-trivial head weights
        for p in model.sim.parameters():
            p.add_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 7, "model": model.official_state_dicts(), "opt": _official_opt(variant == "sparse"),
                "best_rsum": 401.5, "Eiters": 1234}, path)
    loaded = itm_models.load_official_checkpoint(path)
    assert isinstance(loaded, GSMN) and not loaded.training
    assert loaded.sim.variant == variant and not loaded.sim.propagate
    assert loaded.checkpoint_info == {"epoch": 7, "best_rsum": 401.5, "Eiters": 1234}
    images, ids, lens, boxes, sizes, parses = tiny_batch(5)
    with torch.no_grad():
        img_emb, cap_emb = model.encode_images(images), model.encode_captions(ids, lens)
        assert torch.equal(loaded.encode_images(images), img_emb)
        assert torch.equal(loaded.encode_captions(ids, lens), cap_emb)
        assert torch.equal(loaded.sims(img_emb, cap_emb, lens, boxes, sizes, parses),
                           model.sims(img_emb, cap_emb, lens, boxes, sizes, parses))
    # a wrong-shaped tensor, a missing entry
    sds = model.official_state_dicts()
    sds[3] = dict(sds[3], **{"out_1.weight_v": torch.zeros(32, 31)})
    torch.save({"epoch": 7, "model": sds, "opt": _official_opt(variant == "sparse"), "best_rsum": 1.0,
                "Eiters": 1}, path)
    with pytest.raises(CheckpointError, match=r"(?s)GSMN.*out_1\.weight_v"):
        itm_models.load_official_checkpoint(path)
    torch.save({"epoch": 7, "model": model.official_state_dicts()[:3], "opt": _official_opt(variant == "sparse"),
                "best_rsum": 1.0, "Eiters": 1}, path)
    with pytest.raises(CheckpointError, match="GSMN checkpoint has 4"):
        itm_models.load_official_checkpoint(path)


# ------------------------------------------------------------------------------------------------------------------
# Blocked evaluation
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, propagate", [("dense", False), ("sparse", False), ("dense", True),
                                                ("sparse", True)])
def test_sims_blocking_and_forward(variant, propagate):
    """sims is independent of block_pairs and equals forward in eval mode (float64 exact to 1e-12, float32 1e-6);
    parts add up to the scores."""
    head = random_head(variant, propagate, 21)
    img, cap, lens, boxes, parses = random_inputs(22, n_img=5, n_cap=7, lens=(7, 1, 4, 2, 6, 3, 7))
    ref = head.sims(img, cap, lens, boxes, parses=parses)
    for block_pairs in (1, 3, 7, 10_000):
        got = head.sims(img, cap, lens, boxes, parses=parses, block_pairs=block_pairs)
        assert_close_report(got, ref, atol=1e-12, rtol=0, what=f"block_pairs={block_pairs}")
    vis, txt = head.sims(img, cap, lens, boxes, parses=parses, block_pairs=2, return_parts=True)
    assert_close_report(vis + txt, ref, atol=1e-12, rtol=0, what="parts")
    with torch.no_grad():
        assert_close_report(head(img, cap, lens, boxes, parses=parses), ref, atol=1e-12, rtol=0, what="forward")
    # float32 inputs and the dtype argument
    got32 = head.sims(img.float(), cap.float(), lens, boxes.float(), parses=parses, block_pairs=3)
    assert got32.dtype == torch.float32
    assert_close_report(got32, ref, atol=1e-5, rtol=0, what="float32")
    assert_close_report(head.sims(img, cap, lens, boxes, parses=parses, dtype=torch.float32), got32, atol=1e-6,
                        rtol=0, what="dtype=float32")
