"""node_match (GSMN's node-level matching vectors): the tiled torch op against the float64 reference spec over ragged
sizes, dtypes, block counts and temperatures; tiling, caption order and padding independence; float64 gradcheck
and gradients against the reference's autograd; opcheck; argument checks."""
from __future__ import annotations

import importlib
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

nm = importlib.import_module("itm_kernels.node_match")
nm_torch = importlib.import_module("itm_kernels.node_match.torch")
from itm_kernels.node_match import node_match, node_match_reference
from conftest import assert_close_report

pytestmark = pytest.mark.usefixtures("one_thread")

# Allowed |node_match - float64 reference| (absolute: the outputs are cosines in [-1, 1]) as
# factor x PyTorch's own error + floor, where PyTorch's own error is that of the reference computed in the op's
# compute dtype (float32 for float32, bfloat16 and float16 inputs, which are upcast inside) against float64, on the
# same rounded inputs. The float32 floor covers the Gram formulation's tail: |ctx_b|^2 = alpha^T G_b alpha loses
# about u * (sum_t alpha_t |e_t,b|)^2 / |ctx_b|^2 where the attended context is short compared with its words (the
# reference, forming ctx_b, loses only the square root of that factor); blocks narrower than GRAM_MIN_BLOCK_WIDTH
# form their contexts explicitly, which removed the measured tail (9.4e-5 beyond twice PyTorch's at 3..8 features).
FLOAT32_FLOOR = 2e-5
TOL = {
    torch.float64: dict(factor=0.0, floor=1e-12),
    torch.float32: dict(factor=2.0, floor=FLOAT32_FLOOR),
    torch.bfloat16: dict(factor=2.0, floor=FLOAT32_FLOOR),
    torch.float16: dict(factor=2.0, floor=FLOAT32_FLOOR),
}
LAMBDAS = [0.0, 1.0, 9.0, 20.0]
TILES = [None, 1, 64, 700, 5000]          # bytes; 1 = one image x one caption per tile
MIN_BLOCK_WIDTH = 1                       # d / num_blocks of the accuracy tests (see TOL)


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def problem(seed, n_img=3, n_cap=4, K=5, L=6, d=16, *, scale="unit", pad="garbage", dtype=torch.float64):
    """l2-normalised regions and words (GSMN's encoders), optionally rescaled per row or globally; lengths with L
    and 1 in shuffled order; padding rows hold ``pad`` ("garbage": large finite values, "nan", "inf")."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    images, captions = unit(n_img, K, d), unit(n_cap, L, d)
    if scale == "rows":
        images = images * 10 ** (2 * torch.rand(n_img, K, 1, generator=g, dtype=torch.float64) - 1)
        captions = captions * 10 ** (2 * torch.rand(n_cap, L, 1, generator=g, dtype=torch.float64) - 1)
    elif scale == "large":
        images, captions = images * 300.0, captions * 40.0
    elif scale == "small":
        images, captions = images * 0.05, captions * 0.02
    lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    lens[0] = L
    if n_cap > 1:
        lens[1] = 1
    lens = lens[torch.randperm(n_cap, generator=g)]
    padding = torch.arange(L)[None, :] >= lens[:, None]
    fill = {"garbage": 7.0 + 30.0 * torch.randn(int(padding.sum()), d, generator=g, dtype=torch.float64),
            "nan": torch.full((int(padding.sum()), d), float("nan"), dtype=torch.float64),
            "inf": torch.full((int(padding.sum()), d), float("inf"), dtype=torch.float64)}[pad]
    captions[padding] = fill
    return images.to(dtype), captions.to(dtype), lens


@st.composite
def problems(draw, max_n_img=4, max_n_cap=6, max_K=9, max_L=7, max_d=64):
    """(problem() keywords, node_match options): d = num_blocks x (3 .. max_d / num_blocks)."""
    num_blocks = draw(st.sampled_from([1, 2, 4, 16]))
    shape = dict(seed=draw(st.integers(0, 2**31 - 1)), n_img=draw(st.integers(1, max_n_img)),
                 n_cap=draw(st.integers(1, max_n_cap)), K=draw(st.integers(1, max_K)),
                 L=draw(st.integers(1, max_L)),
                 d=num_blocks * draw(st.integers(MIN_BLOCK_WIDTH, max_d // num_blocks)),
                 scale=draw(st.sampled_from(["unit", "unit", "rows", "large", "small"])))
    return shape, dict(num_blocks=num_blocks, lambda_softmax=draw(st.sampled_from(LAMBDAS)))


@pytest.mark.parametrize("dtype", list(TOL))
@given(case=problems(), tile=st.sampled_from(TILES))
def test_matches_reference(dtype, case, tile):
    """Every dtype against the float64 reference on the same (rounded) inputs, within TOL; shapes, dtypes, and word
    rows beyond each caption's length exactly zero."""
    shape, opts = case
    images, captions, lens = problem(**shape, dtype=dtype)
    n_img, K, _ = images.shape
    n_cap, L, _ = captions.shape
    region, word = node_match(images, captions, lens, backend="torch", max_tile_bytes=tile, **opts)
    out_dtype = compute_dtype(dtype)
    assert region.dtype == word.dtype == out_dtype
    assert region.shape == (n_img, n_cap, K, opts["num_blocks"])
    assert word.shape == (n_img, n_cap, L, opts["num_blocks"])
    padding = torch.arange(L)[None, :] >= lens[:, None]
    assert bool((word[:, padding] == 0).all()), "word rows beyond the caption length must be exactly zero"

    exact = node_match_reference(images.double(), captions.double(), lens, **opts)
    tol = TOL[dtype]
    own = node_match_reference(images, captions, lens, compute_dtype=out_dtype, **opts) if tol["factor"] else None
    for k, (name, got, want) in enumerate(zip(("region", "word"), (region, word), exact)):
        own_err = max_err(own[k], want) if own is not None else 0.0
        assert_close_report(got, want, atol=tol["factor"] * own_err + tol["floor"], rtol=0,
                            what=f"{name} {dtype} tile={tile} {shape} {opts} (PyTorch's own error {own_err:.2e})")


@given(case=problems(), tile=st.sampled_from(TILES[1:]))
def test_independent_of_tile_size(case, tile):
    shape, opts = case
    images, captions, lens = problem(**shape)
    whole = node_match(images, captions, lens, backend="torch", **opts)
    tiled = node_match(images, captions, lens, backend="torch", max_tile_bytes=tile, **opts)
    for name, a, b in zip(("region", "word"), tiled, whole):
        assert_close_report(a, b, atol=1e-12, rtol=0, what=f"{name} tile={tile} {shape} {opts}")


@pytest.mark.parametrize("tile", [1, 64, 700])
def test_small_tiles_split_images_and_captions(tile):
    """The tile sizes used above do split the image axis and the (length-sorted) caption axis, and pad a tile
    only to its longest caption."""
    lens = [1, 2, 3, 5, 6, 6]
    plan = list(nm_torch._plan(n_img=4, K=5, lens_sorted=lens, num_blocks=4, elem=8, max_tile_bytes=tile))
    caption_groups = {(j0, j1) for _, _, j0, j1, _ in plan}
    assert len(caption_groups) > 1
    assert any(i1 - i0 < 4 for i0, i1, *_ in plan)
    assert all(Lt == lens[j1 - 1] for _, _, _, j1, Lt in plan)
    # every (image, caption) pair exactly once
    pairs = sorted((i, j) for i0, i1, j0, j1, _ in plan for i in range(i0, i1) for j in range(j0, j1))
    assert pairs == [(i, j) for i in range(4) for j in range(len(lens))]


@given(seed=st.integers(0, 10_000), tile=st.sampled_from([None, 1, 700]))
def test_caption_order_and_sub_blocks(seed, tile):
    """Captions in any length order: each pair's output depends only on that pair, wherever it sits."""
    images, captions, lens = problem(seed, n_img=4, n_cap=6, K=4, L=7, d=12)
    opts = dict(num_blocks=4, lambda_softmax=9.0, backend="torch", max_tile_bytes=tile)
    region, word = node_match(images, captions, lens, **opts)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed))[:4]
    sub_region, sub_word = node_match(images[[3, 1]], captions[perm], lens[perm], **opts)
    assert_close_report(sub_region, region[[3, 1]][:, perm], atol=1e-12, rtol=0, what="region sub-block")
    assert_close_report(sub_word, word[[3, 1]][:, perm], atol=1e-12, rtol=0, what="word sub-block")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("pad", ["garbage", "nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padding_content_never_matters(backend, pad, dtype):
    images, captions, lens = problem(11, pad=pad, dtype=dtype)
    zeroed = torch.where((torch.arange(captions.shape[1])[None, :] < lens[:, None])[..., None], captions, 0.0)
    for tile in (None, 1):
        a = node_match(images, captions, lens, num_blocks=4, backend=backend, max_tile_bytes=tile)
        b = node_match(images, zeroed, lens, num_blocks=4, backend=backend, max_tile_bytes=tile)
        assert all(bool(x.isfinite().all()) for x in a), f"{pad} padding leaked into the output"
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"{backend}: {pad} padding changed the output"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_backend_reference_equals_torch(dtype):
    for seed, (K, L, d, B) in enumerate([(5, 6, 16, 4), (1, 1, 3, 1), (9, 7, 48, 16), (3, 2, 64, 2)]):
        images, captions, lens = problem(seed, K=K, L=L, d=d, dtype=dtype)
        ref = node_match(images, captions, lens, num_blocks=B, backend="reference")
        got = node_match(images, captions, lens, num_blocks=B, backend="torch")
        auto = node_match(images, captions, lens, num_blocks=B)       # the default backend, whichever it is
        # float32 compute: float32 evaluations of one function (reference: ctx_b formed; torch: Gram form)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for name, a, b, c in zip(("region", "word"), got, ref, auto):
            assert a.dtype == b.dtype == c.dtype == compute_dtype(dtype)
            assert_close_report(a, b, atol=tol, rtol=0, what=f"{name} torch vs reference {dtype} {(K, L, d, B)}")
            assert_close_report(c, b, atol=tol, rtol=0, what=f"{name} auto vs reference {dtype} {(K, L, d, B)}")


def test_awkward_sizes_against_reference():
    """GSMN's K = 36, odd d, lengths up to 33, several tiles."""
    images, captions, lens = problem(3, n_img=3, n_cap=5, K=36, L=33, d=111)
    for B in (1, 37):
        got = node_match(images, captions, lens, num_blocks=B, backend="torch", max_tile_bytes=20_000)
        want = node_match_reference(images, captions, lens, num_blocks=B)
        for name, a, b in zip(("region", "word"), got, want):
            assert_close_report(a, b, atol=1e-12, rtol=0, what=f"{name} K=36 d=111 B={B}")


@pytest.mark.parametrize("seed, d", [(8, 16), (3, 16), (5, 32), (11, 48)])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_narrow_blocks_stay_accurate(seed, d, backend):
    """1 to 3 features per block: the Gram form |ctx_b|^2 = alpha^T G_b alpha cancelled there (float32 cosines of
    253 at seed 8, d = 16); below GRAM_MIN_BLOCK_WIDTH features a tile now forms its contexts explicitly."""
    images, captions, lens = problem(seed, n_img=4, n_cap=6, K=9, L=7, d=d, dtype=torch.float32)
    region, word = node_match(images, captions, lens, num_blocks=16, lambda_softmax=1.0, backend=backend)
    exact = node_match_reference(images.double(), captions.double(), lens, num_blocks=16, lambda_softmax=1.0)
    own = node_match_reference(images, captions, lens, num_blocks=16, lambda_softmax=1.0)
    for name, got, want, mine in zip(("region", "word"), (region, word), exact, own):
        assert got.abs().max().item() <= 1 + 1e-5, f"{name}: a cosine of {got.abs().max().item():.3g}"
        assert_close_report(got, want, atol=2 * max_err(mine, want) + TOL[torch.float32]["floor"], rtol=0,
                            what=f"{name} d/num_blocks=1")


# --------------------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------------------

def count_tiles(monkeypatch):
    calls = []
    real = nm_torch._tile

    def counted(*args, **kw):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kw)

    monkeypatch.setattr(nm_torch, "_tile", counted)
    return calls


@pytest.mark.parametrize("tile", [None, 1, 300])
def test_gradcheck_float64(tile, monkeypatch):
    images, captions, lens = problem(7, n_img=2, n_cap=3, K=3, L=4, d=8)
    fn = lambda im, cap: node_match(im, cap, lens, num_blocks=2, lambda_softmax=9.0, backend="torch",  # noqa: E731
                                    max_tile_bytes=tile)
    args = (images.clone().requires_grad_(), captions.clone().requires_grad_())
    calls = count_tiles(monkeypatch)
    region, word = fn(*args)
    (region.sum() + word.sum()).backward()
    backward_tiles = sum(calls)          # the backward recomputes each tile with grad enabled
    assert backward_tiles == len(calls) - backward_tiles, "the backward visits the forward's tiles"
    if tile is None:
        assert backward_tiles == 1
    else:                                # 1 byte: one tile per (image, caption) pair
        assert backward_tiles == 6 if tile == 1 else backward_tiles > 1
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_padding_gradient_is_zero():
    images, captions, lens = problem(9, n_img=3, n_cap=5, K=4, L=6, d=12, pad="nan")
    for tile in (None, 1):
        im, cap = images.clone().requires_grad_(), captions.clone().requires_grad_()
        region, word = node_match(im, cap, lens, num_blocks=4, backend="torch", max_tile_bytes=tile)
        (region.sum() + (word * 1.5).sum()).backward()
        padding = torch.arange(6)[None, :] >= lens[:, None]
        assert bool(padding.any())
        assert bool((cap.grad[padding] == 0).all()), "padding rows must get exactly zero gradient"
        assert bool(cap.grad.isfinite().all()) and bool(im.grad.isfinite().all())
        assert cap.grad[~padding].abs().max().item() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(seed=st.integers(0, 10_000), tile=st.sampled_from([None, 1, 2000]), lam=st.sampled_from(LAMBDAS))
def test_gradients_match_reference_autograd(dtype, seed, tile, lam):
    images, captions, lens = problem(seed, n_img=3, n_cap=4, K=7, L=6, d=24, scale="rows")
    opts = dict(num_blocks=4, lambda_softmax=lam)
    g = torch.Generator().manual_seed(seed)
    w_region = torch.randn(3, 4, 7, 4, generator=g, dtype=torch.float64)
    w_word = torch.randn(3, 4, 6, 4, generator=g, dtype=torch.float64)

    def grads(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (images, captions)]
        region, word = fn(*leaves)
        ((region * w_region.to(region.dtype)).sum() + (word * w_word.to(word.dtype)).sum()).backward()
        return [t.grad.double() for t in leaves]

    reference = lambda im, cap: node_match_reference(im, cap, lens, **opts)  # noqa: E731
    exact = grads(reference, torch.float64)
    got = grads(lambda im, cap: node_match(im, cap, lens, backend="torch", max_tile_bytes=tile, **opts), dtype)
    own = grads(reference, dtype) if dtype == torch.float32 else None
    for k, (name, r, o) in enumerate(zip(("images", "captions"), exact, got)):
        scale = max(1.0, r.abs().max().item())
        own_err = max_err(own[k], r) if own is not None else 0.0
        # float64: rounding only; float32: twice PyTorch's own float32 error, plus a floor for the Gram form's
        # cancellation (see TOL): over 3200 draws of this test, the excess was <= 6.7e-6 x scale in 99.9%, at most
        # 3.4e-5 x scale (seed 181, lambda 20)
        allowed = 1e-10 * scale if dtype == torch.float64 else 2 * own_err + 1e-4 * scale
        assert_close_report(o, r, atol=allowed, rtol=0,
                            what=f"d {name} {dtype} tile={tile} (PyTorch's own error {own_err:.2e})")


# --------------------------------------------------------------------------------------------------------------
# torch.library
# --------------------------------------------------------------------------------------------------------------

def op_args(requires_grad, tile=1, backend="torch"):
    images, captions, lens = problem(2, n_img=2, n_cap=3, K=3, L=4, d=8)
    return (images.requires_grad_(requires_grad), captions.requires_grad_(requires_grad), lens, 9.0, 2, backend,
            tile)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_opcheck_forward(backend):
    """Every default test (schema, autograd registration, fake tensor, AOT dispatch) on inputs without grad."""
    torch.library.opcheck(torch.ops.itm_kernels.node_match.default, op_args(False, backend=backend))


def test_opcheck_with_grad():
    """Every opcheck test, inputs requiring grad: schema, autograd registration, fake tensors, AOT dispatch."""
    torch.library.opcheck(torch.ops.itm_kernels.node_match.default, op_args(True))


def test_opcheck_aot_dispatch_with_grad():
    """The backward is a registered op (itm_kernels::node_match_backward), so AOT autograd traces through it."""
    torch.library.opcheck(torch.ops.itm_kernels.node_match.default, op_args(True),
                          test_utils="test_aot_dispatch_dynamic")


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------

def _good():
    return dict(images=torch.randn(2, 4, 8), captions=torch.randn(3, 5, 8), cap_lens=torch.tensor([5, 1, 3]))


@pytest.mark.parametrize("change, error, words", [
    (dict(images=torch.randn(4, 8)), ValueError, "images must have 3 dimensions"),
    (dict(captions=torch.randn(3, 5, 8, 1)), ValueError, "captions must have 3 dimensions"),
    (dict(captions=torch.randn(3, 5, 6)), ValueError, "must share the feature size d"),
    (dict(captions=torch.randn(3, 5, 8, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(images=torch.ones(2, 4, 8, dtype=torch.int32)), TypeError, "images must be float16"),
    (dict(captions=torch.ones(3, 5, 8, dtype=torch.int64)), TypeError, "captions must be float16"),
    (dict(images=torch.randn(2, 4, 8).numpy()), TypeError, "images must be a torch.Tensor"),
    (dict(captions=torch.randn(3, 5, 8, device="meta")), ValueError, "must be on the same device"),
    (dict(images=torch.randn(0, 4, 8)), ValueError, "images must not be empty"),
    (dict(images=torch.randn(2, 0, 8)), ValueError, "images must not be empty"),
    (dict(images=torch.randn(2, 4, 0), captions=torch.randn(3, 5, 0)), ValueError, "images must not be empty"),
    (dict(captions=torch.randn(3, 0, 8)), ValueError, "captions must not be empty"),
    (dict(captions=torch.randn(0, 5, 8), cap_lens=torch.tensor([], dtype=torch.long)), ValueError,
     "captions must not be empty"),
    (dict(cap_lens=torch.tensor([5, 0, 3])), ValueError, "cap_lens must lie in 1..5"),
    (dict(cap_lens=torch.tensor([6, 1, 3])), ValueError, "cap_lens must lie in 1..5"),
    (dict(cap_lens=[5, 1, -2]), ValueError, "cap_lens must lie in 1..5"),
    (dict(cap_lens=torch.tensor([5, 1])), ValueError, "cap_lens must have shape (3,)"),
    (dict(cap_lens=torch.tensor([[5, 1, 3]])), ValueError, "cap_lens must have shape (3,)"),
    (dict(cap_lens=torch.tensor([5.0, 1.0, 3.0])), TypeError, "cap_lens must hold integers"),
    (dict(cap_lens=[5.0, 1.0, 3.0]), TypeError, "cap_lens must hold integers"),
    (dict(cap_lens=torch.tensor([True, True, True])), TypeError, "cap_lens must hold integers"),
    (dict(cap_lens=5), TypeError, "cap_lens must be an integer tensor or sequence"),
    (dict(num_blocks=3), ValueError, "num_blocks must be a positive int that divides d=8"),
    (dict(num_blocks=0), ValueError, "num_blocks must be a positive int"),
    (dict(num_blocks=-2), ValueError, "num_blocks must be a positive int"),
    (dict(num_blocks=True), ValueError, "num_blocks must be a positive int"),
    (dict(num_blocks=2.0), ValueError, "num_blocks must be a positive int"),
    (dict(lambda_softmax=-1.0), ValueError, "lambda_softmax must be finite and >= 0"),
    (dict(lambda_softmax=float("nan")), ValueError, "lambda_softmax must be finite"),
    (dict(lambda_softmax=float("inf")), ValueError, "lambda_softmax must be finite"),
    (dict(lambda_softmax="20"), TypeError, "lambda_softmax must be a real number"),
    (dict(backend="cuda"), ValueError, "backend 'cuda' needs CUDA tensors"),
    (dict(backend="numpy"), ValueError, "backend must be one of"),
    (dict(max_tile_bytes=0), ValueError, "max_tile_bytes must be a positive int"),
    (dict(max_tile_bytes=-5), ValueError, "max_tile_bytes must be a positive int"),
    (dict(max_tile_bytes=1.5), ValueError, "max_tile_bytes must be a positive int"),
    (dict(max_tile_bytes=True), ValueError, "max_tile_bytes must be a positive int"),
])
def test_bad_input_is_named(change, error, words):
    args = {**_good(), "num_blocks": 2, **change}
    tensors = [args.pop(k) for k in ("images", "captions", "cap_lens")]
    with pytest.raises(error, match=re.escape(words)):
        node_match(*tensors, **args)


def test_lengths_accept_lists_and_numpy():
    args = _good()
    a = node_match(**args, num_blocks=2)
    b = node_match(args["images"], args["captions"], args["cap_lens"].tolist(), num_blocks=2)
    c = node_match(args["images"], args["captions"], args["cap_lens"].numpy().astype("int32"), num_blocks=2)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))


# --------------------------------------------------------------------------------------------------------------
# The compiled CPU epilogue (csrc/node_match/cpu.cpp): 16 blocks of >= 16 features
# --------------------------------------------------------------------------------------------------------------

needs_cpu_kernel = pytest.mark.skipif(not nm._have_cpu_kernel(), reason="itm_kernels._C not built")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed, n_img, n_cap, K, L, d, tile", [
    (0, 3, 5, 36, 12, 256, None), (1, 5, 7, 9, 17, 256, 3000), (2, 2, 9, 1, 5, 512, 1),
    (3, 4, 3, 17, 33, 1024, 20000), (4, 1, 1, 36, 1, 256, None)])
@pytest.mark.parametrize("scale", ["unit", "rows"])
def test_cpu_backend_matches_reference(dtype, seed, n_img, n_cap, K, L, d, tile, scale):
    images, captions, lens = problem(seed, n_img=n_img, n_cap=n_cap, K=K, L=L, d=d, scale=scale, dtype=dtype)
    got = node_match(images, captions, lens, lambda_softmax=20.0, backend="cpu", max_tile_bytes=tile)
    want = node_match_reference(images.double(), captions.double(), lens, lambda_softmax=20.0)
    own = node_match_reference(images.to(nm._out_dtype(dtype)), captions.to(nm._out_dtype(dtype)), lens,
                               lambda_softmax=20.0)
    tol = TOL[dtype]
    for name, g, w, o in zip(("region", "word"), got, want, own):
        assert g.dtype == nm._out_dtype(dtype)
        assert_close_report(g, w, atol=tol["factor"] * max_err(o, w) + tol["floor"], rtol=0,
                            what=f"cpu {name} {dtype} seed={seed}")
    word = got[1]
    pad = torch.arange(L)[None, :] >= lens[:, None]
    assert (word[:, pad] == 0).all()


@needs_cpu_kernel
def test_cpu_kernel_checks_its_inputs():
    """The C++ boundary rejects bad tensors with a message (never a crash or a silent wrong result)."""
    f32 = dict(dtype=torch.float32)
    good = dict(region=torch.empty(2, 3, 4, 16, **f32), word=torch.empty(2, 3, 5, 16, **f32),
                img_blk=torch.zeros(2, 4, 2, 16, **f32), cap_blk=torch.zeros(3, 8, 2, 16, **f32),
                img_gram=torch.zeros(2, 4, 4, 16, **f32), img_sq=torch.ones(2, 4, 16, **f32),
                cap_gram=torch.zeros(3, 5, 5, 16, **f32), cap_sq=torch.ones(3, 5, 16, **f32),
                lens=torch.tensor([5, 1, 3]), index=torch.tensor([0, 2, 1]))

    def call(**change):
        a = {**good, **change}
        torch.ops.itm_kernels.node_match_fused_(a["region"], a["word"], a["img_blk"], a["cap_blk"], a["img_gram"],
                                                a["img_sq"], a["cap_gram"], a["cap_sq"], a["lens"], a["index"], 20.0)

    call()
    for change, words in [(dict(lens=torch.tensor([6, 1, 3])), "cap_lens[0] = 6"),
                          (dict(index=torch.tensor([0, 3, 1])), "cap_index[1] = 3"),
                          (dict(img_blk=torch.zeros(2, 4, 4, 8, **f32)), "16 blocks"),
                          (dict(img_blk=torch.zeros(2, 3, 2, 16, **f32)), "padded to multiples of 4"),
                          (dict(cap_gram=torch.zeros(3, 4, 5, 16, **f32)), "cap_gram must be"),
                          (dict(img_sq=torch.ones(2, 4, 16, dtype=torch.float64)), "img_sq must be"),
                          (dict(lens=torch.tensor([5.0, 1.0, 3.0])), "cap_lens must be"),
                          (dict(word=torch.empty(2, 3, 4, 16, **f32)), "word must be")]:
        with pytest.raises(RuntimeError, match=re.escape(words)):
            call(**change)
