"""local_sim (SGRAF's fused local similarity vectors): the chunked torch implementation and the C++ "cpu" backend
(where built; tests/local_sim/test_local_sim_cpu.py has its own) against the reference spec over ragged sizes and dtypes,
float64 gradcheck, float32 gradients against the reference's autograd, opcheck, padding independence and argument
checks. Tests without a backend argument run "auto" ("cpu" where the extension is built)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from itm_kernels.local_sim import _have_cpu_kernel, local_sim, local_sim_backward_op, local_sim_op, local_sim_reference
from conftest import assert_close_report

FORWARD_BACKENDS = ["torch"] + (["cpu"] if _have_cpu_kernel() else [])


def problem(seed, n_img=3, n_cap=4, K=5, L=6, d=17, s=8, dtype=torch.float64):
    """Unit-norm regions and words (as SGRAF's encoders produce), lengths with 1 and L_max, Xavier-scale weights;
    padding rows hold large garbage that must never be read."""
    g = torch.Generator().manual_seed(seed)
    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    images, captions = unit(n_img, K, d), unit(n_cap, L, d)
    lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    lens[0] = L
    if n_cap > 1:
        lens[-1] = 1
    pad = torch.arange(L)[None, :] >= lens[:, None]
    captions[pad] = 7.0 + 3 * torch.randn(int(pad.sum()), d, generator=g, dtype=torch.float64)
    r = (6.0 / (d + s)) ** 0.5
    weight = (torch.rand(s, d, generator=g, dtype=torch.float64) * 2 - 1) * r
    bias = torch.rand(s, generator=g, dtype=torch.float64) * 0.1 - 0.05
    return images.to(dtype), captions.to(dtype), lens, weight.to(dtype), bias.to(dtype)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@given(seed=st.integers(0, 10_000), n_img=st.integers(1, 3), n_cap=st.integers(1, 4), K=st.integers(1, 6),
       L=st.integers(1, 7), d=st.sampled_from([3, 17, 59]), s=st.sampled_from([4, 16]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       tile=st.sampled_from([0, 1, 600, 1 << 20]), lam=st.sampled_from([9.0, 4.0]))
def test_matches_reference(seed, n_img, n_cap, K, L, d, s, dtype, tile, lam):
    """float64: 1e-12. float32 / bfloat16: at most twice the error of the reference computed entirely in that
    dtype (PyTorch's own error), plus 2e-6 / 2e-3, both against the float64 reference on the same rounded inputs.
    Outputs are unit vectors, so these are absolute errors on values in [-1, 1]."""
    images, captions, lens, weight, bias = problem(seed, n_img, n_cap, K, L, d, s, dtype)
    exact = local_sim_reference(images.double(), captions.double(), lens, weight.double(), bias.double(),
                                lambda_softmax=lam)
    pad = torch.arange(L)[None, :] >= lens[:, None]
    own = None
    for backend in FORWARD_BACKENDS:
        out = local_sim(images, captions, lens, weight, bias, lambda_softmax=lam, max_tile_bytes=tile or None,
                        backend=backend)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert out.shape == (n_img, n_cap, L, s)
        assert out[:, pad].abs().max().item() == 0 if pad.any() else True
        if dtype == torch.float64:
            assert_close_report(out, exact, atol=1e-12, rtol=0, what=f"{backend} float64")
            continue
        if own is None:
            own = local_sim_reference(images, captions, lens, weight, bias, lambda_softmax=lam, compute_dtype=dtype)
        floor = 2e-6 if dtype == torch.float32 else 2e-3
        allowed = 2 * max_err(own, exact) + floor
        assert_close_report(out, exact, atol=allowed, rtol=0,
                            what=f"{backend} {dtype} (PyTorch's own error {max_err(own, exact):.2e})")


@pytest.mark.parametrize("backend", FORWARD_BACKENDS)
def test_awkward_sizes_against_reference(backend):
    """SGRAF's K = 36 with odd d, s and lengths up to 33, several tiles."""
    images, captions, lens, weight, bias = problem(3, n_img=3, n_cap=5, K=36, L=33, d=111, s=37)
    out = local_sim(images, captions, lens, weight, bias, max_tile_bytes=20_000, backend=backend)
    assert_close_report(out, local_sim_reference(images, captions, lens, weight, bias), atol=1e-12, rtol=0,
                        what="K=36 d=111 s=37")


@pytest.mark.parametrize("backend", FORWARD_BACKENDS)
def test_padding_content_is_never_read(backend):
    images, captions, lens, weight, bias = problem(11)
    other = captions.clone()
    pad = torch.arange(captions.shape[1])[None, :] >= lens[:, None]
    other[pad] = 0.0
    assert torch.equal(local_sim(images, captions, lens, weight, bias, backend=backend),
                       local_sim(images, other, lens, weight, bias, backend=backend))


def test_backend_reference_and_auto_agree():
    images, captions, lens, weight, bias = problem(5)
    for backend in ["auto"] + FORWARD_BACKENDS:
        assert_close_report(local_sim(images, captions, lens, weight, bias, backend="reference"),
                            local_sim(images, captions, lens, weight, bias, backend=backend), atol=1e-12, rtol=0,
                            what=f"reference vs {backend}")


@pytest.mark.parametrize("tile", [None, 200])
def test_gradcheck_float64(tile):
    images, captions, lens, weight, bias = problem(7, n_img=2, n_cap=3, K=3, L=4, d=5, s=4)
    args = tuple(t.clone().requires_grad_() for t in (images, captions, weight, bias))
    fn = lambda im, cap, w, b: local_sim(im, cap, lens, w, b, max_tile_bytes=tile)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@given(seed=st.integers(0, 10_000), tile=st.sampled_from([0, 300, 1 << 20]))
def test_float32_gradients_match_reference_autograd(seed, tile):
    images, captions, lens, weight, bias = problem(seed, n_img=3, n_cap=4, K=7, L=6, d=24, s=8)
    g = torch.randn(3, 4, 6, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def grads(fn, dtype):
        leaves = [t.detach().clone().to(dtype).requires_grad_() for t in (images, captions, weight, bias)]
        out = fn(*leaves)
        (out * g.to(out.dtype)).sum().backward()
        return [t.grad.double() for t in leaves]

    reference = lambda im, cap, w, b: local_sim_reference(im, cap, lens, w, b)  # noqa: E731
    exact, own = grads(reference, torch.float64), grads(reference, torch.float32)
    got = grads(lambda im, cap, w, b: local_sim(im, cap, lens, w, b, max_tile_bytes=tile or None), torch.float32)
    pad = torch.arange(6)[None, :] >= lens[:, None]
    assert got[1][pad].abs().max().item() == 0 if pad.any() else True
    for name, r, pt, o in zip(("images", "captions", "weight", "bias"), exact, own, got):
        scale = max(1.0, r.abs().max().item())
        allowed = 2 * max_err(pt, r) + 1e-5 * scale       # twice PyTorch's own float32 error, plus a floor
        assert_close_report(o, r, atol=allowed, rtol=0, what=f"d {name} (PyTorch's own error {max_err(pt, r):.2e})")


def test_opcheck():
    images, captions, lens, weight, bias = problem(2, n_img=2, n_cap=3, K=4, L=5, d=6, s=4)
    args = tuple(t.clone().requires_grad_() for t in (images, captions)) + (lens,) + \
        tuple(t.clone().requires_grad_() for t in (weight, bias))
    torch.library.opcheck(local_sim_op, args + (9.0, "torch", 0))
    grad = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    torch.library.opcheck(local_sim_backward_op, (grad, images, captions, lens, weight, bias, 9.0, 0))


def test_bfloat16_weights_float32():
    """bfloat16 features with float32 weights (the SGRAF head's bf16 evaluation): the weight is cast for the GEMM."""
    images, captions, lens, weight, bias = problem(4, d=64, s=16)
    out = local_sim(images.bfloat16(), captions.bfloat16(), lens, weight.float(), bias.float())
    assert out.dtype == torch.float32
    assert max_err(out, local_sim_reference(images, captions, lens, weight, bias)) < 3e-2


@pytest.mark.parametrize("change, match", [
    (dict(images=torch.zeros(2, 3)), "3 dimensions"),
    (dict(captions=torch.zeros(2, 4, 5)), "feature size"),
    (dict(weight=torch.zeros(4, 5, dtype=torch.float64)), r"weight must be \(s, d=6\)"),
    (dict(bias=torch.zeros(3, dtype=torch.float64)), r"bias \(s,\)"),
    (dict(cap_lens=[0, 1, 2]), "1..5"),
    (dict(cap_lens=[1, 6, 2]), "1..5"),
    (dict(cap_lens=[1.0, 2.0, 3.0]), "integers"),
    (dict(backend="cuda"), "backend"),
    (dict(lambda_softmax=-1.0), "lambda_softmax"),
])
def test_bad_arguments(change, match):
    images, captions, lens, weight, bias = problem(0, n_img=2, n_cap=3, K=4, L=5, d=6, s=4)
    kw = dict(images=images, captions=captions, cap_lens=lens, weight=weight, bias=bias)
    opts = {k: change.pop(k) for k in ("backend", "lambda_softmax") if k in change}
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        local_sim(kw["images"], kw["captions"], kw["cap_lens"], kw["weight"], kw["bias"], **opts)


def test_torch_compile_fullgraph():
    """The registered op (fake implementation, autograd formula) traces without graph breaks; aot_eager keeps the
    test fast (no C++ code generation) while exercising the same tracing."""
    images, captions, lens, weight, bias = problem(1, n_img=2, n_cap=3, K=4, L=5, d=6, s=4)
    fn = lambda im, cap, w, b: (local_sim(im, cap, lens, w, b) * 2).sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (images, captions, weight, bias)]
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (images, captions, weight, bias)]
    ref = fn(*ref_leaves)
    ref.backward()
    assert_close_report(out, ref, atol=1e-12, rtol=0, what="compiled value")
    for a, b in zip(leaves, ref_leaves):
        assert_close_report(a.grad, b.grad, atol=1e-12, rtol=0, what="compiled gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_into_strided_out_with_gram(dtype):
    """local_sim_torch(out=, gram=) (what SGRAFSimilarity.sims uses): rows written into a strided view of a larger
    node tensor in another dtype equal local_sim's rows cast once; padding rows zeroed; the rest untouched."""
    from itm_kernels.local_sim import local_sim_gram, local_sim_torch

    images, captions, lens, weight, bias = problem(3, n_img=3, n_cap=4, K=5, L=6, d=17, s=8, dtype=dtype)
    want = local_sim(images, captions, lens, weight, bias, max_tile_bytes=600, backend="torch")
    for node_dtype in (torch.float32, torch.bfloat16):
        nodes = torch.full((3, 4, 9, 8), 5.0, dtype=node_dtype)                # node 0 and nodes 7, 8 are not ours
        local_sim_torch(images, captions, lens, weight, bias, lambda_softmax=9.0, max_tile_bytes=600,
                        out=nodes[:, :, 1:7], gram=local_sim_gram(images))
        assert torch.equal(nodes[:, :, 1:7], want.to(node_dtype))
        assert (nodes[:, :, 0] == 5).all() and (nodes[:, :, 7:] == 5).all()
    with pytest.raises(ValueError, match="out must be"):
        local_sim_torch(images, captions, lens, weight, bias, lambda_softmax=9.0, out=nodes[:, :, 1:6])
    with pytest.raises(ValueError, match="gram must be"):
        local_sim_torch(images, captions, lens, weight, bias, lambda_softmax=9.0,
                        gram=local_sim_gram(images)[:2])


def test_gpu_backends_refuse_cpu_tensors_clearly():
    """backend="cuda" on CPU tensors (or without a CUDA build) is a ValueError naming what is missing; so is
    "triton" where triton cannot run on the tensors' device."""
    images, captions, lens, weight, bias = problem(2, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        local_sim(images, captions, lens, weight, bias, backend="cuda")
    from itm_kernels._common.dispatch import available_backends

    if "triton" not in available_backends("cpu"):
        with pytest.raises(ValueError, match="backend 'triton' is not available"):
            local_sim(images, captions, lens, weight, bias, backend="triton")
