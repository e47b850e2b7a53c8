"""attention="hard" (path: itm_kernels.xattn_sim.hard, shared by every backend) against reference.hard_all_pairs,
a direct loop, float64 gradcheck, NaN/Inf padding, and the bad-option error."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import itm_kernels
from itm_kernels.xattn_sim import reference
from conftest import assert_close_report, cpu_backends


def make(n_img, n_cap, K, L, d, seed, dtype=torch.float32, poison=True):
    g = torch.Generator().manual_seed(seed)
    im = torch.randn(n_img, K, d, generator=g, dtype=torch.float64).to(dtype)
    cap = torch.randn(n_cap, L, d, generator=g, dtype=torch.float64).to(dtype)
    lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    lens[0] = L
    il = torch.randint(1, K + 1, (n_img,), generator=g)
    if poison:
        for c in range(n_cap):
            cap[c, lens[c]:] = float("nan") if c % 2 else float("inf")
        for i in range(n_img):
            im[i, il[i]:] = float("nan")
    return im, cap, lens, il


def loop_hard(im, cap, lens, il, direction, agg):
    out = torch.empty(im.shape[0], cap.shape[0], dtype=torch.float64)
    for i in range(im.shape[0]):
        for c in range(cap.shape[0]):
            v, e = im[i, :il[i]].double(), cap[c, :lens[c]].double()
            cos = (e @ v.t()) / (e.norm(dim=1)[:, None] * v.norm(dim=1)[None]).clamp_min(1e-8)  # (L, K)
            r = cos.amax(1) if direction == "t2i" else cos.amax(0)
            out[i, c] = {"mean": r.mean(), "max": r.max(), "sum": r.sum(),
                         "lse": torch.logsumexp(6.0 * r, 0) / 6.0}[agg]
    return out


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("agg", ["mean", "lse", "max", "sum"])
def test_reference_equals_loop(direction, agg):
    im, cap, lens, il = make(3, 4, 5, 6, 7, 0, torch.float64)
    ref = reference.xattn_sim(im, cap, lens, img_lens=il, direction=direction, agg=agg, attention="hard")
    assert_close_report(ref, loop_hard(im, cap, lens, il, direction, agg), atol=1e-12, rtol=1e-12, what="ref")


@given(n_img=st.integers(1, 5), n_cap=st.integers(1, 6), K=st.integers(1, 5), L=st.integers(1, 6),
       d=st.integers(1, 9), seed=st.integers(0, 99), direction=st.sampled_from(["t2i", "i2t"]),
       agg=st.sampled_from(["mean", "lse", "max", "sum"]), tile=st.sampled_from([None, 64, 4096]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_hard_matches_reference(n_img, n_cap, K, L, d, seed, direction, agg, tile, dtype):
    im, cap, lens, il = make(n_img, n_cap, K, L, d, seed, dtype)
    ref = reference.xattn_sim(im.double(), cap.double(), lens, img_lens=il, direction=direction, agg=agg,
                              attention="hard")
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5}[dtype]  # bf16: exact products in fp32
    for backend in cpu_backends():
        got = itm_kernels.xattn_sim(im, cap, lens, img_lens=il, direction=direction, agg=agg, attention="hard",
                                    backend=backend, max_tile_bytes=tile)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close_report(got, ref, atol=tol, rtol=tol, what=f"{backend} {dtype}")


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_hard_gradcheck(direction):
    im, cap, lens, il = make(2, 3, 3, 4, 5, 1, torch.float64, poison=False)
    im.requires_grad_(True)
    cap.requires_grad_(True)
    f = lambda a, b: itm_kernels.xattn_sim(a, b, lens, img_lens=il, direction=direction, agg="lse",  # noqa: E731
                                           attention="hard", backend="torch", max_tile_bytes=256)
    assert torch.autograd.gradcheck(f, (im, cap))
    # the tiled backward equals the reference's autograd
    g = torch.randn(2, 3, dtype=torch.float64)
    ga = torch.autograd.grad(f(im, cap), (im, cap), g)
    gr = torch.autograd.grad(reference.xattn_sim(im, cap, lens, img_lens=il, direction=direction, agg="lse",
                                                 attention="hard"), (im, cap), g)
    for a, b in zip(ga, gr):
        assert_close_report(a, b, atol=1e-12, rtol=1e-10, what="grad")


def test_hard_grad_padding_poisoned_stays_finite():
    im, cap, lens, il = make(2, 3, 4, 5, 6, 2, torch.float32)
    im.requires_grad_(True)
    cap.requires_grad_(True)
    itm_kernels.xattn_sim(im, cap, lens, img_lens=il, attention="hard", agg="mean").sum().backward()
    assert torch.isfinite(im.grad).all() and torch.isfinite(cap.grad).all()


def test_bad_attention():
    im, cap, lens, _ = make(1, 1, 2, 2, 3, 0)
    with pytest.raises(ValueError, match="attention must be one of"):
        itm_kernels.xattn_sim(im, cap, lens, attention="sparse")
