"""xattn_sim autograd: float64 gradcheck per backend, gradients against the reference's autograd, opcheck and
torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import itm_kernels
from itm_kernels.xattn_sim import reference
from itm_kernels.xattn_sim import xattn_sim_backward_op, xattn_sim_op
from conftest import assert_close_report, cpu_backends

BACKENDS = cpu_backends()


def small_problem(seed, n_img=3, n_cap=4, K=5, L=4, d=6, ragged_images=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_img, K, d, generator=g, dtype=dtype)
    captions = torch.randn(n_cap, L, d, generator=g, dtype=dtype)
    cap_lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    cap_lens[0], cap_lens[-1] = L, 1
    img_lens = torch.randint(1, K + 1, (n_img,), generator=g) if ragged_images else None
    return images, captions, cap_lens, img_lens


# The default run gradchecks three norms (the official default, plain l2 and none); the other four are slow checks.
DEFAULT_RUN_NORMS = ("clipped_l2norm", "l2norm", "no_norm")


# Every backend's forward is checked against the shared tiled backward ("reference" has the same backward).
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("norm", [n if n in DEFAULT_RUN_NORMS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in reference.NORMS])
def test_gradcheck_float64(backend, direction, norm):
    images, captions, cap_lens, img_lens = small_problem(reference.NORMS.index(norm), n_img=2, n_cap=3, K=4, L=3, d=4)
    for agg in reference.AGGS:
        fn = lambda im, cap: itm_kernels.xattn_sim(  # noqa: E731
            im, cap, cap_lens, img_lens=img_lens, direction=direction, norm=norm, agg=agg, lambda_softmax=4.0,
            lambda_lse=3.0, backend=backend)
        assert torch.autograd.gradcheck(fn, (images.requires_grad_(), captions.requires_grad_()), eps=1e-6,
                                        atol=1e-7, rtol=1e-5), (backend, direction, norm, agg)


@given(seed=st.integers(0, 10_000), direction=st.sampled_from(reference.DIRECTIONS),
       norm=st.sampled_from(reference.NORMS), agg=st.sampled_from(reference.AGGS),
       tile=st.sampled_from([0, 300, 1 << 20]))
def test_float32_gradients_match_reference_autograd(seed, direction, norm, agg, tile):
    images, captions, cap_lens, img_lens = small_problem(seed, n_img=4, n_cap=5, K=7, L=6, d=16)
    opts = dict(direction=direction, norm=norm, agg=agg, lambda_softmax=9.0, lambda_lse=6.0)
    weights = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def grads(fn, dtype):
        im = images.detach().clone().to(dtype).requires_grad_()
        cap = captions.detach().clone().to(dtype).requires_grad_()
        out = fn(im, cap)
        (out * weights.to(out.dtype)).sum().backward()
        return im.grad.double(), cap.grad.double()

    ref_im, ref_cap = grads(lambda im, cap: reference.xattn_sim(im, cap, cap_lens, img_lens=img_lens, **opts),
                            torch.float64)
    got_im, got_cap = grads(lambda im, cap: itm_kernels.xattn_sim(
        im, cap, cap_lens, img_lens=img_lens, max_tile_bytes=tile or None, **opts), torch.float32)
    scale = max(1.0, ref_im.abs().max().item(), ref_cap.abs().max().item())
    assert_close_report(got_im / scale, ref_im / scale, atol=5e-5, rtol=0, what=f"d images {opts}")
    assert_close_report(got_cap / scale, ref_cap / scale, atol=5e-5, rtol=0, what=f"d captions {opts}")


def test_padding_gets_zero_gradient():
    images, captions, cap_lens, img_lens = small_problem(5)
    images.requires_grad_()
    captions.requires_grad_()
    itm_kernels.xattn_sim(images, captions, cap_lens, img_lens=img_lens).sum().backward()
    word_pad = torch.arange(captions.shape[1])[None, :] >= cap_lens[:, None]
    region_pad = torch.arange(images.shape[1])[None, :] >= img_lens[:, None]
    assert word_pad.any() and region_pad.any(), "the problem must have padding on both sides"
    assert captions.grad[word_pad].abs().max() == 0
    assert images.grad[region_pad].abs().max() == 0


def test_max_aggregation_ties_match_pytorch_subgradient():
    images = torch.randn(2, 3, 4, dtype=torch.float64)
    word = torch.randn(1, 1, 4, dtype=torch.float64)
    captions = word.repeat(2, 3, 1)  # identical words: every R_t ties
    lens = torch.tensor([3, 2])
    for backend in BACKENDS:
        im_a = images.clone().requires_grad_()
        cap_a = captions.clone().requires_grad_()
        itm_kernels.xattn_sim(im_a, cap_a, lens, agg="max", backend=backend).sum().backward()
        im_b = images.clone().requires_grad_()
        cap_b = captions.clone().requires_grad_()
        reference.xattn_sim(im_b, cap_b, lens, agg="max").sum().backward()
        assert_close_report(im_a.grad, im_b.grad, atol=1e-12, rtol=1e-10, what=f"{backend} images")
        assert_close_report(cap_a.grad, cap_b.grad, atol=1e-12, rtol=1e-10, what=f"{backend} captions")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    images, captions, cap_lens, img_lens = small_problem(1)
    args = (images.requires_grad_(), captions.requires_grad_(), cap_lens, img_lens, "t2i", "clipped_l2norm", 9.0,
            "lse", 6.0, backend, 0)
    torch.library.opcheck(xattn_sim_op, args)
    grad = torch.randn(3, 4, dtype=torch.float64)
    torch.library.opcheck(xattn_sim_backward_op, (grad, images.detach(), captions.detach(), cap_lens, img_lens,
                                                  "i2t", "softmax", 4.0, "mean", 5.0, 0))


class TinyHead(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.img_proj = torch.nn.Linear(d, d)
        self.cap_proj = torch.nn.Linear(d, d)

    def forward(self, images, captions, cap_lens):
        im = torch.nn.functional.normalize(self.img_proj(images), dim=-1)
        cap = torch.nn.functional.normalize(self.cap_proj(captions), dim=-1)
        sims = itm_kernels.xattn_sim(im, cap, cap_lens, backend="torch")
        diag = sims.diagonal()
        return (0.2 + sims - diag[:, None]).clamp_min(0).sum()


def test_torch_compile_fullgraph_training_step():
    torch.manual_seed(0)
    model = TinyHead()
    images, captions = torch.randn(4, 5, 8), torch.randn(4, 6, 8)
    lens = torch.tensor([6, 3, 1, 4])
    eager_loss = model(images, captions, lens)
    eager_loss.backward()
    eager_grad = model.img_proj.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(images, captions, lens)
    loss.backward()
    assert_close_report(loss, eager_loss, atol=1e-6, rtol=1e-6, what="compiled loss")
    assert_close_report(model.img_proj.weight.grad, eager_grad, atol=1e-5, rtol=1e-5, what="compiled grad")
