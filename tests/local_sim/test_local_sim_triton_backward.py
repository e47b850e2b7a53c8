"""The fused Triton backward of local_sim (``itm_kernels.local_sim.triton.local_sim_backward_triton``), run in the
Triton interpreter on CPU tensors at tiny sizes, against the gradients autograd takes through the float64
reference (t2i: ``local_sim_reference``; i2t: ``local_sim_i2t_reference``) on the inputs as the kernel sees them.

Tolerances, |got - truth| <= atol + rtol |truth| per gradient:
  * float64 (the backward accumulates in float64 for float64 inputs): 1e-10 + 1e-9 relative.
  * float32: ``TOL32`` = 2e-5 absolute + 2e-5 relative (measured: a few 1e-6 at gradients of size 1-20).
  * bfloat16 / float16 inputs: the backward widens the rounded inputs to float32 and differentiates exactly, while
    the forward rounds alpha / (|a| + eps) and (a^ - e)^2 to the input dtype before its products; the gradient
    compared here is that of the float64 function on the rounded inputs: the float32 tolerance plus one ulp of
    the input dtype relative (the gradients are returned in it: bf16 2^-7, fp16 2^-10).
Padding words are poisoned with NaN and Inf; they must get exactly zero gradient and change nothing else.
The interpreter runs 16-wide d-chunks, so d = 40 covers three chunks with a ragged end; s = 20 pads the s tile.
"""
import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton")

from itm_kernels.local_sim import local_sim, local_sim_i2t_reference, local_sim_reference  # noqa: E402
from itm_kernels.local_sim import triton as tls  # noqa: E402
from conftest import assert_close_report  # noqa: E402
from kernel_helpers import run_kernel_tests_in_child, triton_mode  # noqa: E402

_MODE = triton_mode()
DEVICE, KERNELS_HERE, needs_kernels = _MODE.DEVICE, _MODE.KERNELS_HERE, _MODE.needs_kernels
TOL32 = 2e-5
TOL64 = (1e-10, 1e-9)


def make_problem(n_img, n_cap, K, L_max, d, s, cap_lens, *, seed=0):
    """float64 unit-norm regions/words, Xavier-scale weight, small bias; (images, poisoned captions, clean
    captions, lens, weight, bias). Padding words hold NaN in feature 0 and +-inf elsewhere."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    images, clean = unit(n_img, K, d), unit(n_cap, L_max, d)
    lens = torch.tensor(cap_lens, dtype=torch.long)
    pad = torch.arange(L_max)[None, :] >= lens[:, None]
    clean = clean.masked_fill(pad[..., None], 0.0)
    poisoned = clean.masked_fill(pad[..., None], float("inf"))
    poisoned[:, :, 1::2] = poisoned[:, :, 1::2].masked_fill(pad[..., None], float("-inf"))
    poisoned[:, :, 0].masked_fill_(pad, float("nan"))
    r = (6.0 / (d + s)) ** 0.5
    weight = (torch.rand(s, d, generator=g, dtype=torch.float64) * 2 - 1) * r
    bias = torch.rand(s, generator=g, dtype=torch.float64) * 0.1 - 0.05
    return images, poisoned, clean, lens, weight, bias


def reference_grads(images, clean, lens, weight, bias, grad, direction, lam):
    spec = local_sim_reference if direction == "t2i" else local_sim_i2t_reference
    leaves = [t.double().clone().requires_grad_(True) for t in (images, clean, weight, bias)]
    out = spec(leaves[0], leaves[1], lens, leaves[2], leaves[3], lambda_softmax=lam)
    return torch.autograd.grad(out, leaves, grad.double())


def fused_grads(images, captions, lens, weight, bias, grad, direction, lam, dtype):
    args = [t.to(DEVICE) for t in (grad.to(torch.float64 if dtype == torch.float64 else torch.float32),
                                   images.to(dtype), captions.to(dtype), lens, weight.to(dtype),
                                   bias.to(dtype))]
    got = tls.local_sim_backward_triton(*args, lambda_softmax=lam, direction=direction)
    return [t.cpu() for t in got]


def check(got, truth, lens, dtype, direction, what):
    atol, rtol = TOL64 if dtype == torch.float64 else (TOL32, TOL32)
    if dtype in (torch.bfloat16, torch.float16):
        rtol += torch.finfo(dtype).eps          # the float32 gradient is returned rounded to the input dtype
    for name, a, b in zip(("images", "captions", "weight", "bias"), got, truth):
        assert a.dtype == dtype, (what, name, a.dtype)
        assert_close_report(a, b, atol=atol, rtol=rtol, what=f"{what}: d{name}")
    pad = torch.arange(got[1].shape[1])[None, :] >= lens[:, None]
    assert torch.equal(got[1][pad], torch.zeros_like(got[1][pad])), f"{what}: padding words got a gradient"


def output_rows(direction, K, L_max):
    return L_max if direction == "t2i" else K


@needs_kernels
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_gradients(direction, dtype):
    """2 images x 3 captions of 7, 1 and 4 of L_max = 7 words, K = 5, d = 40 (three d-chunks), s = 20, lambda 9."""
    images, poisoned, clean, lens, weight, bias = make_problem(2, 3, 5, 7, 40, 20, [7, 1, 4], seed=1)
    grad = torch.randn(2, 3, output_rows(direction, 5, 7), 20, generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64)
    if direction == "t2i":
        grad[:, 1, 1:] = float("nan")          # rows beyond a caption's length are never read
    got = fused_grads(images, poisoned, lens, weight, bias, grad, direction, 9.0, dtype)
    x, y, w, b = (t.to(dtype) for t in (images, clean, weight, bias))
    grad = torch.nan_to_num(grad, nan=0.0)
    truth = reference_grads(x, y, lens, w, b, grad, direction, 9.0)
    check(got, truth, lens, dtype, direction, f"{direction} {dtype}")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    images, poisoned, clean, lens, weight, bias = make_problem(2, 2, 36, 5, 24, 16, [5, 2], seed=3)
    grad = torch.randn(2, 2, 5, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = fused_grads(images, poisoned, lens, weight, bias, grad, "t2i", 9.0, dtype)
    x, y, w, b = (t.to(dtype) for t in (images, clean, weight, bias))
    truth = reference_grads(x, y, lens, w, b, grad, "t2i", 9.0)
    check(got, truth, lens, dtype, "t2i", f"t2i {dtype}")


@needs_kernels
@pytest.mark.slow  # ~1-2 s per example in the interpreter
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n_img=st.integers(1, 2), n_cap=st.integers(1, 2), K=st.integers(1, 17),
       L=st.integers(1, 17), d=st.sampled_from([16, 23]), s=st.sampled_from([8, 17]),
       direction=st.sampled_from(["t2i", "i2t"]), lam=st.sampled_from([9.0, 4.0]), data=st.data())
def test_property_matches_reference_gradients(seed, n_img, n_cap, K, L, d, s, direction, lam, data):
    """Shapes across the 16/32-row tiles (K and L up to 17), ragged d, padded s, both directions, float32."""
    lens = data.draw(st.lists(st.integers(1, L), min_size=n_cap, max_size=n_cap), label="cap_lens")
    images, poisoned, clean, lens, weight, bias = make_problem(n_img, n_cap, K, L, d, s, lens, seed=seed)
    grad = torch.randn(n_img, n_cap, output_rows(direction, K, L), s, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)
    got = fused_grads(images, poisoned, lens, weight, bias, grad, direction, lam, torch.float32)
    x, y, w, b = (t.float() for t in (images, clean, weight, bias))
    if direction == "t2i":
        grad = grad.masked_fill((torch.arange(L)[None, :] >= lens[:, None])[None, :, :, None], 0.0)
    truth = reference_grads(x, y, lens, w, b, grad, direction, lam)
    check(got, truth, lens, torch.float32, direction, f"{direction} K={K} L={L} d={d} s={s}")


class _FusedBackward(torch.autograd.Function):
    """The float64 reference forward with the fused kernel as its backward, for gradcheck."""

    @staticmethod
    def forward(ctx, images, captions, weight, bias, lens, direction):
        ctx.save_for_backward(images, captions, weight, bias, lens)
        ctx.direction = direction
        spec = local_sim_reference if direction == "t2i" else local_sim_i2t_reference
        return spec(images, captions, lens, weight, bias, lambda_softmax=9.0)

    @staticmethod
    def backward(ctx, grad):
        images, captions, weight, bias, lens = ctx.saved_tensors
        got = tls.local_sim_backward_triton(grad, images, captions, lens, weight, bias, lambda_softmax=9.0,
                                            direction=ctx.direction)
        return (*got, None, None)


@needs_kernels
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_float64_gradcheck(direction):
    """torch.autograd.gradcheck of the fused backward (float64 accumulation) against the numerical Jacobian of
    the float64 reference, w.r.t. images, captions, weight and bias (padding words included: the reference never
    reads them, so their numerical derivative is 0, as the kernel's gradient must be)."""
    images, _, clean, lens, weight, bias = make_problem(1, 2, 3, 4, 16, 4, [4, 2], seed=5)
    leaves = [t.to(DEVICE).requires_grad_(True) for t in (images, clean, weight, bias)]
    lens = lens.to(DEVICE)

    def fn(*xs):
        return _FusedBackward.apply(*xs, lens, direction)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@needs_kernels
def test_public_api_routes_the_fused_backward(monkeypatch):
    """After local_sim(backend="triton") autograd runs local_sim_backward_triton (t2i, and i2t as one kernel);
    other backends and shapes beyond bwd_supported run the tiled torch backward."""
    images, poisoned, clean, lens, weight, bias = make_problem(1, 2, 3, 4, 16, 8, [4, 2], seed=6)
    calls = []
    real = tls.local_sim_backward_triton
    monkeypatch.setattr(tls, "local_sim_backward_triton", lambda *a, **k: calls.append(k["direction"]) or real(*a, **k))
    for direction in ("t2i", "i2t"):
        leaves = [t.float().to(DEVICE).requires_grad_(True) for t in (images, clean, weight, bias)]
        out = local_sim(leaves[0], leaves[1], lens.to(DEVICE), leaves[2], leaves[3], backend="triton",
                        direction=direction)
        out.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    assert calls == ["t2i", "i2t"]
    monkeypatch.setattr(tls, "BWD_MAX_QS", 16)              # beyond the fused backward's tile: torch backward
    leaves = [t.float().to(DEVICE).requires_grad_(True) for t in (images, clean)]
    local_sim(leaves[0], leaves[1], lens.to(DEVICE), weight.float().to(DEVICE), bias.float().to(DEVICE),
              backend="triton").sum().backward()
    assert calls == ["t2i", "i2t"]


def test_bwd_supported_is_a_shape_rule():
    f32 = lambda *shape: torch.empty(*shape)  # noqa: E731
    assert tls.bwd_supported(f32(2, 36, 8), f32(3, 32, 8), f32(256, 8), "t2i")          # 64 x 32 x 256
    assert tls.bwd_supported(f32(2, 36, 8), f32(3, 33, 8), f32(256, 8), "t2i")          # 64 words x 256
    assert not tls.bwd_supported(f32(2, 36, 8), f32(3, 65, 8), f32(256, 8), "t2i")      # 128 words x 256 > tile
    assert tls.bwd_supported(f32(2, 36, 8), f32(3, 60, 8), f32(256, 8), "i2t")          # 64 regions x 256
    assert not tls.bwd_supported(f32(2, 36, 8), f32(3, 129, 8), f32(16, 8), "i2t")      # 129 words of context
    assert not tls.bwd_supported(f32(2, 36, 8).int(), f32(3, 4, 8), f32(16, 8), "t2i")


@pytest.mark.skipif(KERNELS_HERE, reason="the kernel tests run in this process")
def test_kernel_tests_in_fresh_interpreter_process():
    run_kernel_tests_in_child(__file__, "1", marks="not gpu and not slow")
