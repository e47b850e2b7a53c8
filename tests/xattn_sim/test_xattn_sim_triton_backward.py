"""The fused Triton backward of xattn_sim (``itm_kernels.xattn_sim.triton.xattn_sim_backward``), run in the Triton
interpreter on CPU tensors (compiled on a GPU when one is there), against autograd through the float64 reference.

Path checked: ``_xattn_sim_bwd_kernel`` (both launches: per context item and per query item) and its routing as the
backward of a ``backend="triton"`` forward. Tolerances: float64 1e-10 (observed ~1e-15); float32 inputs 2e-4
absolute on gradients of size ~1 against the float64 truth; bfloat16 inputs: the float64 truth on the bf16-rounded
inputs, 2e-4 plus one bf16 rounding of the returned gradient (rtol 2^-7) (the kernel widens bf16 and accumulates in float32; the interpreter cannot run native bf16 dots).
"""
import os
import sys

_TRITON_PREIMPORTED = "triton" in sys.modules
if not _TRITON_PREIMPORTED:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import itm_kernels  # noqa: E402
from itm_kernels.xattn_sim import reference  # noqa: E402
from itm_kernels.xattn_sim import triton as xattn_triton  # noqa: E402
from conftest import assert_close_report  # noqa: E402
from kernel_helpers import run_kernel_tests_in_child, triton_mode  # noqa: E402

_MODE = triton_mode()
DEVICE, KERNELS_HERE, needs_kernels = _MODE.DEVICE, _MODE.KERNELS_HERE, _MODE.needs_kernels
LAMBDAS = {"t2i": dict(lambda_softmax=9.0, lambda_lse=6.0), "i2t": dict(lambda_softmax=4.0, lambda_lse=5.0)}
# Ragged both sides (lengths 1 and the maximum), d = 19: two d-chunks in the interpreter, the second ragged.
SMALL = dict(n_img=3, n_cap=4, K=7, L_max=6, d=19, img_lens=[7, 1, 4], cap_lens=[6, 1, 3, 2])


def make_inputs(n_img, n_cap, K, L_max, d, *, img_lens, cap_lens, seed=0):
    """Unit-norm float64 features; padding poisoned with NaN (images) and 1e30 / NaN (captions)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=2)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, L_max, d, generator=g, dtype=torch.float64), dim=2)
    img_lens, cap_lens = torch.tensor(img_lens), torch.tensor(cap_lens)
    img_pad = (torch.arange(K)[None, :] >= img_lens[:, None])[..., None]
    cap_pad = (torch.arange(L_max)[None, :] >= cap_lens[:, None])[..., None]
    clean = img.masked_fill(img_pad, 0.0), cap.masked_fill(cap_pad, 0.0)
    poisoned_cap = cap.masked_fill(cap_pad, 1e30)
    poisoned_cap[..., 0:1].masked_fill_(cap_pad, float("nan"))
    grad = torch.randn(n_img, n_cap, generator=g, dtype=torch.float64)
    return img.masked_fill(img_pad, float("nan")), poisoned_cap, img_lens, cap_lens, clean, grad


def reference_grads(clean_img, clean_cap, cap_lens, img_lens, grad, **opts):
    a, b = clean_img.clone().requires_grad_(), clean_cap.clone().requires_grad_()
    out = reference.xattn_sim(a, b, cap_lens, img_lens=img_lens, **opts)
    return torch.autograd.grad(out, (a, b), grad)


def fused(img, cap, cap_lens, img_lens, grad, **opts):
    g_img, g_cap = xattn_triton.xattn_sim_backward(grad.to(DEVICE), img.to(DEVICE), cap.to(DEVICE),
                                                   cap_lens.to(DEVICE), img_lens.to(DEVICE), **opts)
    return g_img.cpu(), g_cap.cpu()


def check(direction, norm, agg, dtype, tol, seed=0):
    # The gradients are returned in the input dtype: one rounding to it on top of the kernel's float32 error.
    rtol = max(tol, torch.finfo(dtype).eps)
    img, cap, img_lens, cap_lens, (clean_img, clean_cap), grad = make_inputs(**SMALL, seed=seed)
    opts = dict(direction=direction, norm=norm, agg=agg, **LAMBDAS[direction])
    g_img, g_cap = fused(img.to(dtype), cap.to(dtype), cap_lens, img_lens, grad, **opts)
    assert g_img.dtype == dtype and g_cap.dtype == dtype
    e_img, e_cap = reference_grads(clean_img.to(dtype).double(), clean_cap.to(dtype).double(), cap_lens, img_lens,
                                   grad, **opts)
    assert torch.isfinite(g_img).all() and torch.isfinite(g_cap).all(), "padding leaked into the gradients"
    assert_close_report(g_img, e_img, atol=tol, rtol=rtol, what=f"d images {dtype} {opts}")
    assert_close_report(g_cap, e_cap, atol=tol, rtol=rtol, what=f"d captions {dtype} {opts}")


# Every norm in both directions, the aggregations rotated through them (the full grid is the slow test below).
SAMPLED = [(direction, norm, reference.AGGS[(i + j) % len(reference.AGGS)])
           for j, direction in enumerate(reference.DIRECTIONS) for i, norm in enumerate(reference.NORMS)]


@needs_kernels
@pytest.mark.parametrize("direction,norm,agg", SAMPLED)
def test_float64_matches_reference_gradients(direction, norm, agg):
    check(direction, norm, agg, torch.float64, 1e-10)


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize("agg", reference.AGGS)
@pytest.mark.parametrize("norm", reference.NORMS)
@pytest.mark.parametrize("direction", reference.DIRECTIONS)
def test_float64_full_grid(direction, norm, agg):
    check(direction, norm, agg, torch.float64, 1e-10, seed=5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", reference.DIRECTIONS)
def test_low_precision_inputs(direction, dtype):
    check(direction, "clipped_l2norm", "lse", dtype, 2e-4, seed=1)


@needs_kernels
def test_padding_rows_get_zero_gradient_and_grad_scales_linearly():
    img, cap, img_lens, cap_lens, _, grad = make_inputs(**SMALL, seed=2)
    opts = dict(direction="t2i", norm="softmax", agg="max", **LAMBDAS["t2i"])
    g_img, g_cap = fused(img, cap, cap_lens, img_lens, grad, **opts)
    assert (g_img[1, 1:] == 0).all() and (g_cap[1, 1:] == 0).all() and (g_cap[3, 2:] == 0).all()
    g2_img, g2_cap = fused(img, cap, cap_lens, img_lens, 2 * grad, **opts)
    assert_close_report(g2_img, 2 * g_img, atol=1e-12, rtol=1e-12, what="linearity in grad")


@needs_kernels
def test_training_through_triton_backend_uses_the_fused_backward(monkeypatch):
    """backend="triton": autograd calls xattn_sim.triton.xattn_sim_backward (and its result is the reference's)."""
    if "triton" not in itm_kernels.available_backends(DEVICE):
        pytest.skip("the dispatcher does not offer the triton backend here")
    calls = []
    real = xattn_triton.xattn_sim_backward
    monkeypatch.setattr(xattn_triton, "xattn_sim_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    img, cap, img_lens, cap_lens, (clean_img, clean_cap), grad = make_inputs(**SMALL, seed=3)
    a, b = img.to(DEVICE).requires_grad_(), cap.to(DEVICE).requires_grad_()
    opts = dict(direction="i2t", norm="clipped_l2norm", agg="lse", **LAMBDAS["i2t"])
    out = itm_kernels.xattn_sim(a, b, cap_lens, img_lens=img_lens, backend="triton", **opts)
    out.backward(grad.to(DEVICE))
    assert calls == [1]
    e_img, e_cap = reference_grads(clean_img, clean_cap, cap_lens, img_lens, grad, **opts)
    assert_close_report(a.grad.cpu(), e_img, atol=1e-10, rtol=1e-10, what="d images via autograd")
    assert_close_report(b.grad.cpu(), e_cap, atol=1e-10, rtol=1e-10, what="d captions via autograd")


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize("norm,agg", [("clipped_l1norm", "mean"), ("softmax", "sum")])
def test_gradcheck_float64(norm, agg):
    """Finite differences of the Triton forward against the fused backward (float64, tiny sizes)."""
    g = torch.Generator().manual_seed(9)
    img = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    cap = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    lens = torch.tensor([3, 2])
    fn = lambda a, b: itm_kernels.xattn_sim(a, b, lens, direction="t2i", norm=norm, agg=agg,  # noqa: E731
                                            backend="triton")
    assert torch.autograd.gradcheck(fn, (img, cap), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.skipif(KERNELS_HERE, reason="the kernel tests run in this process")
def test_kernel_tests_in_fresh_interpreter_process():
    """This session imported triton before TRITON_INTERPRET=1 could be set: run the kernel tests in a child."""
    run_kernel_tests_in_child(__file__, "1", no_skips=True)
