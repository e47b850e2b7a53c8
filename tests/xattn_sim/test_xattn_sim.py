"""xattn_sim: official goldens, properties against the reference, bad input. Runs every CPU backend."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import itm_kernels
from itm_kernels.xattn_sim import reference
from conftest import assert_close_report, cpu_backends

BACKENDS = cpu_backends()
FAST_BACKENDS = [b for b in BACKENDS if b != "reference"]
AGG_NAMES = {"LogSumExp": "lse", "Mean": "mean", "Max": "max", "Sum": "sum"}
# Tolerance against float64 truth, as a multiple of max(1, |truth|): float64 matches the official float64 run to
# rounding; float32 stays within 1e-6 (the official float32 path itself is about 2e-7 away).
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def parse_golden_name(name: str) -> dict:
    parts = name.split("__")
    opts = dict(direction=parts[0], norm=parts[1], agg=AGG_NAMES[parts[2]], lambda_softmax=float(parts[3][3:]),
                lambda_lse=6.0)
    if len(parts) > 4:
        opts["lambda_lse"] = float(parts[4][3:])
    return opts


def golden_names(golden):
    return [k for k in golden.files if "__" in k and not k.endswith("_fp32input")]


# The readable reference materialises every pair (seconds per golden set): its golden run is a slow check.
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b == "reference" else b
                                     for b in BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_official_goldens(scan_golden, backend, dtype):
    img = torch.from_numpy(scan_golden["img"]).to(dtype)
    cap = torch.from_numpy(scan_golden["cap"]).to(dtype)
    lens = torch.from_numpy(scan_golden["cap_lens"])
    names = golden_names(scan_golden)
    assert len(names) == 42
    for name in names:
        expected = torch.from_numpy(scan_golden[name])
        got = itm_kernels.xattn_sim(img, cap, lens, backend=backend, **parse_golden_name(name))
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tol = TOL[dtype]
        assert_close_report(got, expected, atol=tol, rtol=tol, what=f"{backend} {dtype} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_padding_is_never_read(scan_golden, backend):
    img = torch.from_numpy(scan_golden["img"]).double()
    cap = torch.from_numpy(scan_golden["cap"]).double()
    lens = torch.from_numpy(scan_golden["cap_lens"])
    mask = torch.arange(cap.shape[1])[None, :] < lens[:, None]
    zeroed = cap * mask[..., None]
    for name in ["t2i__clipped_l2norm__LogSumExp__lam9__lse6", "i2t__softmax__Max__lam4"]:
        opts = parse_golden_name(name)
        a = itm_kernels.xattn_sim(img, cap, lens, backend=backend, **opts)
        b = itm_kernels.xattn_sim(img, zeroed, lens, backend=backend, **opts)
        assert torch.equal(a, b), f"{backend}: padding content changed {name}"


@st.composite
def xattn_problems(draw, max_n=5, max_len=9, max_d=40):
    n_img = draw(st.integers(1, max_n))
    n_cap = draw(st.integers(1, max_n))
    K = draw(st.integers(1, max_len))
    L = draw(st.integers(1, max_len))
    d = draw(st.sampled_from([1, 3, 8, 19, max_d]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    cap_lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    cap_lens[0] = L
    cap_lens[-1] = draw(st.sampled_from([1, L]))
    ragged = draw(st.booleans())
    img_lens = torch.randint(1, K + 1, (n_img,), generator=g) if ragged else None
    images = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g, dtype=torch.float64), dim=-1)
    if draw(st.booleans()):
        captions = captions * (0.5 + torch.rand(n_cap, L, 1, generator=g, dtype=torch.float64))
    pad = torch.arange(L)[None, :] >= cap_lens[:, None]
    captions[pad] = 50.0 * torch.randn(int(pad.sum()), d, generator=g, dtype=torch.float64)
    if img_lens is not None:
        rpad = torch.arange(K)[None, :] >= img_lens[:, None]
        images[rpad] = -30.0 * torch.rand(int(rpad.sum()), d, generator=g, dtype=torch.float64)
    opts = dict(direction=draw(st.sampled_from(reference.DIRECTIONS)), norm=draw(st.sampled_from(reference.NORMS)),
                agg=draw(st.sampled_from(reference.AGGS)), lambda_softmax=draw(st.sampled_from([0.0, 1.0, 4.0, 9.0, 20.0])),
                lambda_lse=draw(st.sampled_from([0.5, 5.0, 6.0, 20.0])))
    return images, captions, cap_lens, img_lens, opts


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(problem=xattn_problems())
def test_matches_reference_float64_and_float32(backend, problem):
    images, captions, cap_lens, img_lens, opts = problem
    truth = reference.xattn_sim(images, captions, cap_lens, img_lens=img_lens, **opts)
    got64 = itm_kernels.xattn_sim(images, captions, cap_lens, img_lens=img_lens, backend=backend, **opts)
    assert_close_report(got64, truth, atol=1e-10, rtol=1e-10, what=f"{backend} float64 {opts}")
    got32 = itm_kernels.xattn_sim(images.float(), captions.float(), cap_lens, img_lens=img_lens, backend=backend,
                                  **opts)
    ref32 = reference.xattn_sim(images.float(), captions.float(), cap_lens, img_lens=img_lens, **opts)
    ref_err = (ref32.double() - truth).abs().max().item()
    # The float32 error allowed is that of PyTorch's own float32 computation, doubled, plus a floor for the
    # near-cancellation cases (tiny |a| with lambda_softmax=0) that both amplify.
    scale = truth.abs().clamp_min(1)
    assert_close_report(got32 / scale, truth / scale, atol=2 * ref_err + 2e-5, rtol=0, what=f"{backend} float32 {opts}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@given(problem=xattn_problems(max_d=64))
def test_low_precision_within_twice_reference_error(backend, low, problem):
    images, captions, cap_lens, img_lens, opts = problem
    images, captions = images.to(low), captions.to(low)
    truth = reference.xattn_sim(images.double(), captions.double(), cap_lens, img_lens=img_lens, **opts)
    ref_low = reference.xattn_sim(images, captions, cap_lens, img_lens=img_lens, compute_dtype=low, **opts)
    finite = ref_low.isfinite()
    # float16 arithmetic underflows the 1e-8 epsilons (0/0): such examples measure nothing about PyTorch's error.
    assume(bool(finite.all()))
    ref_err = (ref_low.double() - truth).abs().max().item()
    got = itm_kernels.xattn_sim(images, captions, cap_lens, img_lens=img_lens, backend=backend, **opts)
    assert got.dtype == torch.float32
    assert_close_report(got, truth, atol=2 * ref_err + 1e-5, rtol=0, what=f"{backend} {low} {opts}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(problem=xattn_problems(max_n=7), tile=st.sampled_from([1, 700, 5000, 1 << 20]))
def test_independent_of_tile_size(backend, problem, tile):
    images, captions, cap_lens, img_lens, opts = problem
    whole = itm_kernels.xattn_sim(images, captions, cap_lens, img_lens=img_lens, backend=backend, **opts)
    tiled = itm_kernels.xattn_sim(images, captions, cap_lens, img_lens=img_lens, backend=backend,
                                  max_tile_bytes=tile, **opts)
    assert_close_report(tiled, whole, atol=1e-13, rtol=1e-13, what=f"{backend} tile={tile}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_every_score_depends_only_on_its_pair(backend):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 7, 16, generator=g, dtype=torch.float64)
    captions = torch.randn(9, 5, 16, generator=g, dtype=torch.float64)
    lens = torch.randint(1, 6, (9,), generator=g)
    full = itm_kernels.xattn_sim(images, captions, lens, backend=backend)
    part = itm_kernels.xattn_sim(images[2:5], captions[[8, 1, 4]], lens[[8, 1, 4]], backend=backend)
    assert_close_report(part, full[2:5][:, [8, 1, 4]], atol=1e-13, rtol=1e-13, what="sub-block")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_awkward_sizes(backend):
    g = torch.Generator().manual_seed(11)
    for n_img, n_cap, K, L, d in [(1, 1, 1, 1, 1), (3, 2, 36, 97, 59), (2, 3, 37, 24, 111), (1, 40, 5, 1, 7)]:
        images = torch.randn(n_img, K, d, generator=g, dtype=torch.float64)
        captions = torch.randn(n_cap, L, d, generator=g, dtype=torch.float64)
        lens = torch.randint(1, L + 1, (n_cap,), generator=g)
        for direction in ("t2i", "i2t"):
            want = reference.xattn_sim(images, captions, lens, direction=direction)
            got = itm_kernels.xattn_sim(images, captions, lens, direction=direction, backend=backend)
            assert_close_report(got, want, atol=1e-11, rtol=1e-11, what=f"{backend} {(n_img, n_cap, K, L, d)}")


def _good():
    return torch.randn(2, 4, 8), torch.randn(3, 5, 8), torch.tensor([5, 1, 3])


@pytest.mark.parametrize("mutate, error, words", [
    (lambda a: {**a, "images": a["images"][0]}, ValueError, "images must have 3 dimensions"),
    (lambda a: {**a, "captions": a["captions"][..., :7]}, ValueError, "feature size d"),
    (lambda a: {**a, "cap_lens": torch.tensor([5, 0, 3])}, ValueError, "cap_lens must lie in 1..5"),
    (lambda a: {**a, "cap_lens": torch.tensor([6, 1, 3])}, ValueError, "cap_lens must lie in 1..5"),
    (lambda a: {**a, "cap_lens": torch.tensor([5.0, 1.0, 3.0])}, TypeError, "cap_lens must hold integers"),
    (lambda a: {**a, "cap_lens": torch.tensor([5, 1])}, ValueError, "cap_lens must have shape (3,)"),
    (lambda a: {**a, "img_lens": torch.tensor([5, 1])}, ValueError, "img_lens must lie in 1..4"),
    (lambda a: {**a, "direction": "both"}, ValueError, "direction must be one of"),
    (lambda a: {**a, "norm": "l3norm"}, ValueError, "norm must be one of"),
    (lambda a: {**a, "agg": "LogSumExp"}, ValueError, "agg must be one of"),
    (lambda a: {**a, "lambda_softmax": float("nan")}, ValueError, "lambda_softmax must be finite"),
    (lambda a: {**a, "lambda_softmax": -1.0}, ValueError, "lambda_softmax must be finite and >= 0"),
    (lambda a: {**a, "lambda_lse": 0.0}, ValueError, "lambda_lse must be finite and > 0"),
    (lambda a: {**a, "lambda_lse": float("inf")}, ValueError, "lambda_lse must be finite"),
    (lambda a: {**a, "images": torch.randn(0, 4, 8)}, ValueError, "images must not be empty"),
    (lambda a: {**a, "captions": torch.randn(3, 0, 8), "cap_lens": torch.tensor([1, 1, 1])}, ValueError,
     "captions must not be empty"),
    (lambda a: {**a, "images": torch.ones(2, 4, 8, dtype=torch.int32)}, TypeError, "images must be float16"),
    (lambda a: {**a, "images": a["images"].double()}, TypeError, "same dtype"),
    (lambda a: {**a, "images": a["images"].numpy()}, TypeError, "images must be a torch.Tensor"),
    (lambda a: {**a, "backend": "cuda"}, ValueError, "backend 'cuda' is not available"),
    (lambda a: {**a, "backend": "numpy"}, ValueError, "backend must be one of"),
    (lambda a: {**a, "max_tile_bytes": 0}, ValueError, "max_tile_bytes must be a positive int"),
])
def test_bad_input_is_named(mutate, error, words):
    images, captions, lens = _good()
    args = mutate(dict(images=images, captions=captions, cap_lens=lens))
    images, captions, lens = args.pop("images"), args.pop("captions"), args.pop("cap_lens")
    with pytest.raises(error, match=__import__("re").escape(words)):
        itm_kernels.xattn_sim(images, captions, lens, **args)


def test_lengths_accept_lists_and_numpy():
    images, captions, lens = _good()
    a = itm_kernels.xattn_sim(images, captions, lens)
    b = itm_kernels.xattn_sim(images, captions, lens.tolist())
    c = itm_kernels.xattn_sim(images, captions, np.array(lens.tolist(), dtype=np.int32))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_available_backends_and_build_info():
    names = itm_kernels.available_backends()
    assert "torch" in names and "reference" in names
    info = itm_kernels.build_info()
    assert info["torch"] == torch.__version__
    assert set(info["backends"]) == set(names)
