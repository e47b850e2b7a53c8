"""local_sim(direction="i2t"): every region attends over the caption's words. The reference against a per-pair
loop written from the formulas (SCAN i2t func_attention semantics), every backend against the reference with NaN/
Inf-poisoned padding, float64 gradcheck through the delegated t2i op, float32 gradients against the reference's
autograd, argument checks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from itm_kernels import available_backends
from itm_kernels.local_sim import _have_cpu_kernel, local_sim, local_sim_i2t_reference
from conftest import assert_close_report

BACKENDS = ["torch", "reference"] + (["cpu"] if _have_cpu_kernel() else [])
TRITON = "triton" in available_backends("cpu")


def problem(seed, n_img=3, n_cap=4, K=5, L=6, d=17, s=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    images, captions = unit(n_img, K, d), unit(n_cap, L, d)
    lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    lens[0] = L
    if n_cap > 1:
        lens[-1] = 1
    pad = torch.arange(L)[None, :] >= lens[:, None]
    poison = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    captions[pad] = poison[torch.arange(int(pad.sum())) % 3][:, None].expand(-1, d)
    r = (6.0 / (d + s)) ** 0.5
    weight = (torch.rand(s, d, generator=g, dtype=torch.float64) * 2 - 1) * r
    bias = torch.rand(s, generator=g, dtype=torch.float64) * 0.1 - 0.05
    return images.to(dtype), captions.to(dtype), lens, weight.to(dtype), bias.to(dtype)


def loop_i2t(images, captions, lens, weight, bias, lam):
    """Per pair, from the formulas: regions are the queries, softmax over the caption's words."""
    out = torch.zeros(images.shape[0], captions.shape[0], images.shape[1], weight.shape[0], dtype=torch.float64)
    for i in range(images.shape[0]):
        for c in range(captions.shape[0]):
            v, e = images[i].double(), captions[c, : int(lens[c])].double()
            h = torch.nn.functional.leaky_relu(v @ e.t(), 0.1)                         # (K, l)
            n = h / (h.norm(dim=0, keepdim=True) + 1e-8)                                 # over the regions
            alpha = torch.softmax(lam * n, dim=1)                                        # over the words
            a = alpha @ e
            a = a / (a.norm(dim=1, keepdim=True) + 1e-8)
            y = (a - v).pow(2) @ weight.double().t() + bias.double()
            out[i, c] = y / (y.norm(dim=1, keepdim=True) + 1e-8)
    return out


def test_reference_matches_per_pair_loop():
    images, captions, lens, weight, bias = problem(1)
    ref = local_sim_i2t_reference(images, captions, lens, weight, bias, lambda_softmax=9.0)
    assert torch.isfinite(ref).all()
    assert_close_report(ref, loop_i2t(images, captions, lens, weight, bias, 9.0), atol=1e-12, rtol=0, what="ref")


def test_i2t_differs_from_t2i_roles():
    """Guard against a swapped normalisation axis: the t2i op on the same data is a different function."""
    images, _, lens, weight, bias = problem(2, K=5, L=5)
    captions = torch.nn.functional.normalize(torch.randn(4, 5, 17, dtype=torch.float64), dim=-1)
    lens[:] = 5
    t2i_swapped = local_sim(captions, images, torch.full((images.shape[0],), 5), weight, bias,
                            backend="reference").transpose(0, 1)
    i2t = local_sim(images, captions, lens, weight, bias, direction="i2t", backend="torch")
    assert_close_report(i2t, t2i_swapped, atol=1e-12, rtol=0, what="delegation identity")
    t2i = local_sim(images, captions, lens, weight, bias, backend="reference")
    assert (t2i - i2t).abs().max() > 1e-3


@given(seed=st.integers(0, 10_000), n_img=st.integers(1, 3), n_cap=st.integers(1, 4), K=st.integers(1, 6),
       L=st.integers(1, 7), d=st.sampled_from([3, 17]), s=st.sampled_from([4, 16]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), lam=st.sampled_from([9.0, 4.0]))
def test_backends_match_reference(seed, n_img, n_cap, K, L, d, s, dtype, lam):
    """float64 1e-12; float32 1e-5; bfloat16 5e-2 (products in bfloat16, as the t2i op), all absolute on unit
    vectors against the float64 reference on the same rounded inputs; NaN/Inf padding never leaks."""
    images, captions, lens, weight, bias = problem(seed, n_img, n_cap, K, L, d, s, dtype)
    exact = local_sim_i2t_reference(images.double(), captions.double(), lens, weight.double(), bias.double(),
                                    lambda_softmax=lam)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    for backend in BACKENDS:
        out = local_sim(images, captions, lens, weight, bias, lambda_softmax=lam, backend=backend, direction="i2t")
        assert out.shape == (n_img, n_cap, K, s)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.isfinite(out).all(), backend
        assert_close_report(out, exact, atol=tol, rtol=0, what=f"{backend} {dtype}")


@pytest.mark.skipif(not TRITON, reason="triton (interpreter) not available")
def test_triton_matches_reference():
    images, captions, lens, weight, bias = problem(3, n_img=2, n_cap=3, K=4, L=5, d=16, s=8, dtype=torch.float32)
    exact = local_sim_i2t_reference(images.double(), captions.double(), lens, weight.double(), bias.double())
    out = local_sim(images, captions, lens, weight, bias, backend="triton", direction="i2t")
    assert_close_report(out, exact, atol=1e-5, rtol=0, what="triton")


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if _have_cpu_kernel() else []))
def test_gradcheck_float64(backend):
    images, captions, lens, weight, bias = problem(4, n_img=2, n_cap=3, K=3, L=4, d=5, s=4)
    captions = torch.nan_to_num(captions, nan=0.0, posinf=0.0, neginf=0.0)  # gradcheck perturbs padding too
    args = [t.clone().requires_grad_() for t in (images, captions, weight, bias)]
    fn = lambda v, e, w, b: local_sim(v, e, lens, w, b, backend=backend, direction="i2t")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


def test_float32_gradients_match_reference_autograd():
    images, captions, lens, weight, bias = problem(5, dtype=torch.float32)
    grads = []
    for backend in ("torch", "reference"):
        args = [t.clone().requires_grad_() for t in (images, captions, weight, bias)]
        out = local_sim(args[0], args[1], lens, args[2], args[3], backend=backend, direction="i2t")
        g = torch.Generator().manual_seed(0)
        (out * torch.randn(out.shape, generator=g)).sum().backward()
        grads.append([a.grad for a in args])
    pad = torch.arange(captions.shape[1])[None, :] >= lens[:, None]
    grads[1][1][pad] = 0.0                                                          # reference: zero by where
    for a, b, name in zip(grads[0], grads[1], ("images", "captions", "weight", "bias")):
        assert_close_report(a, b, atol=2e-5, rtol=1e-4, what=name)


def test_bad_direction():
    images, captions, lens, weight, bias = problem(6)
    with pytest.raises(ValueError, match="direction"):
        local_sim(images, captions, lens, weight, bias, direction="both")
