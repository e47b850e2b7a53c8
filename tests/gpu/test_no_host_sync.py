"""No host syncs on the Triton paths (issue 16.4), checked on the CPU: the kernels run in the Triton interpreter on
CPU tensors, and Tensor.item / __int__ / __float__ / __bool__ / tolist / numpy / cpu — every way the host reads a
tensor — raise during the registered ops' forward and backward (``xattn_sim_op``, ``local_sim_op`` (t2i and i2t,
its fused backward), ``node_match_op`` (forward; its backward is the tiled torch one) and the in-kernel top-k
(``itm_kernels.xattn_topk.triton.xattn_topk``) on validated inputs: the
caller-facing wrappers' argument checks are outside this path). On a GPU, tools/gpu_check.py repeats it
with torch.cuda.set_sync_debug_mode("error") and a CUDA-graph capture of a training step."""
import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from itm_kernels.local_sim import local_sim_op  # noqa: E402
from itm_kernels.node_match import node_match_op  # noqa: E402
from itm_kernels.xattn_sim import xattn_sim_op  # noqa: E402
from kernel_helpers import run_kernel_tests_in_child, triton_mode  # noqa: E402

_MODE = triton_mode()
DEVICE, KERNELS_HERE, needs_kernels = _MODE.DEVICE, _MODE.KERNELS_HERE, _MODE.needs_kernels
HOST_READS = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "numpy", "cpu")


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def forbid_host_reads(monkeypatch):
    def make(name):
        def refuse(self, *args, **kwargs):
            raise HostSync(f"Tensor.{name} called on the Triton path (a host sync on a GPU)")
        return refuse

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, make(name))
        yield


def test_the_guard_catches_a_sync(monkeypatch):
    """The guard itself works (else the tests below could not fail)."""
    with forbid_host_reads(monkeypatch):
        with pytest.raises(HostSync):
            int(torch.tensor(3).max())
        with pytest.raises(HostSync):
            torch.tensor([1, 2]).tolist()


@needs_kernels
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_forward_and_backward_never_read_the_host(monkeypatch, direction):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 7, 19, generator=g).to(DEVICE).requires_grad_()
    cap = torch.randn(4, 20, 19, generator=g).to(DEVICE).requires_grad_()       # lengths in two buckets
    cap_lens = torch.tensor([20, 1, 3, 17]).to(DEVICE)
    img_lens = torch.tensor([7, 1, 4]).to(DEVICE)
    grad = torch.randn(3, 4, generator=g).to(DEVICE)
    with forbid_host_reads(monkeypatch):
        out = xattn_sim_op(img, cap, cap_lens, img_lens, direction, "clipped_l2norm", 9.0, "lse", 6.0, "triton", 0,
                           "ieee")
        g_img, g_cap = torch.autograd.grad(out, (img, cap), grad)
    assert torch.isfinite(out).all() and g_img.shape == img.shape and g_cap.shape == cap.shape
    expected = xattn_sim_op(img, cap, cap_lens, img_lens, direction, "clipped_l2norm", 9.0, "lse", 6.0, "torch", 0,
                            "ieee")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_local_sim_forward_and_fused_backward_never_read_the_host(monkeypatch, direction):
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 5, 19, generator=g).to(DEVICE).requires_grad_()
    cap = torch.randn(3, 20, 19, generator=g).to(DEVICE).requires_grad_()       # lengths in two buckets
    weight = (torch.randn(8, 19, generator=g) / 5).to(DEVICE).requires_grad_()
    bias = torch.randn(8, generator=g).to(DEVICE).requires_grad_()
    cap_lens = torch.tensor([20, 1, 3]).to(DEVICE)
    with forbid_host_reads(monkeypatch):
        out = local_sim_op(img, cap, cap_lens, weight, bias, 9.0, "triton", 0, direction, "ieee")
        grads = torch.autograd.grad(out, (img, cap, weight, bias), torch.ones_like(out))
    assert all(torch.isfinite(t).all() for t in grads)
    if direction == "t2i":
        expected = local_sim_op(img, cap, cap_lens, weight, bias, 9.0, "torch", 0)
    else:
        from itm_kernels.local_sim import local_sim_i2t_reference
        expected = local_sim_i2t_reference(img, cap, cap_lens, weight, bias, lambda_softmax=9.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _cancelling(n, rows, d, g, eps=1e-4):
    """(n, rows, d) unit rows whose row 1 is minus row 0 plus ``eps`` on every 5th feature: with equal attention
    weights the attended vector nearly vanishes and the Gram identity cancels (the guard's flagged path)."""
    x = torch.nn.functional.normalize(torch.randn(n, rows, d, generator=g), dim=-1)
    x[:, 1] = -x[:, 0]
    x[:, 1, ::5] += eps
    return x


@needs_kernels
@pytest.mark.parametrize("op", ["xattn_sim", "local_sim"])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_gram_guard_fix_up_never_reads_the_host(monkeypatch, op, direction):
    """The Gram guard's flag and fix-up launches (forward) and flagged pairs (fused backward) stay sync-free."""
    from itm_kernels.local_sim import local_sim_i2t_reference, local_sim_reference
    from itm_kernels.xattn_sim import reference as xattn_reference

    g = torch.Generator().manual_seed(4)
    img = _cancelling(2, 3, 19, g)
    cap = _cancelling(3, 4, 19, g)
    img[:, 2] = 0.0          # lambda 0 and two opposite rows: region 2 must not rescue the cancelling context
    cap[:, 2:] = 0.0
    cap_lens = torch.tensor([2, 2, 2])
    img_lens = torch.tensor([2, 2, 2])[:2]
    img, cap = img.to(DEVICE).requires_grad_(), cap.to(DEVICE).requires_grad_()
    cap_lens, img_lens = cap_lens.to(DEVICE), img_lens.to(DEVICE)
    weight = (torch.randn(8, 19, generator=g) / 5).to(DEVICE)
    bias = torch.randn(8, generator=g).to(DEVICE)
    with forbid_host_reads(monkeypatch):
        if op == "xattn_sim":
            out = xattn_sim_op(img, cap, cap_lens, img_lens, direction, "no_norm", 0.0, "mean", 6.0, "triton", 0,
                               "ieee")
        else:
            out = local_sim_op(img, cap, cap_lens, weight, bias, 0.0, "triton", 0, direction, "ieee")
        grads = torch.autograd.grad(out, (img, cap), torch.ones_like(out))

    def reference(dtype):
        i, c = img.detach().to(dtype).requires_grad_(), cap.detach().to(dtype).requires_grad_()
        if op == "xattn_sim":
            o = xattn_reference.xattn_sim(i, c, cap_lens, img_lens=img_lens, direction=direction, norm="no_norm",
                                          lambda_softmax=0.0, agg="mean")
        else:
            spec = local_sim_reference if direction == "t2i" else local_sim_i2t_reference
            o = spec(i, c, cap_lens, weight.to(dtype), bias.to(dtype), lambda_softmax=0.0)
        return [o.double()] + [x.double() for x in torch.autograd.grad(o, (i, c), torch.ones_like(o))]

    # Unguarded, the cosines were off by up to 1e3 here and the gradients by their own size. Guarded: within 4x the
    # float32 reference's own error plus 1e-5 (forward) / 1e-4 (gradients) of the largest magnitude (as the fuzz).
    truth, ref32 = reference(torch.float64), reference(torch.float32)
    for k, (got, want, r32) in enumerate(zip([out] + list(grads), truth, ref32)):
        tol = 4 * (r32 - want).abs().max().item() + (1e-5 if k == 0 else 1e-4) * (1 + want.abs().max().item())
        assert (got.double() - want).abs().max().item() <= tol, f"output {k}: the guarded path is off"


@needs_kernels
def test_node_match_forward_never_reads_the_host(monkeypatch):
    g = torch.Generator().manual_seed(2)
    img = torch.randn(2, 5, 32, generator=g).to(DEVICE)
    cap = torch.randn(3, 20, 32, generator=g).to(DEVICE)
    cap_lens = torch.tensor([20, 1, 3]).to(DEVICE)
    with forbid_host_reads(monkeypatch):
        region, word = node_match_op(img, cap, cap_lens, 9.0, 4, "triton", 0)
    expected = node_match_op(img, cap, cap_lens, 9.0, 4, "torch", 0)
    torch.testing.assert_close(region, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(word, expected[1], atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("direction, queries", [("t2i", "images"), ("i2t", "images"), ("t2i", "captions")])
def test_xattn_topk_kernel_never_reads_the_host(monkeypatch, direction, queries):
    """The Triton in-kernel top-k on validated inputs (what ``itm_kernels.xattn_topk(backend="triton")`` calls
    after its argument checks): key state, bucket launches and decoding stay on the device."""
    from itm_kernels.xattn_topk import triton as topk_triton

    g = torch.Generator().manual_seed(3)
    img = torch.randn(3, 5, 19, generator=g).to(DEVICE)
    cap = torch.randn(4, 20, 19, generator=g).to(DEVICE)       # lengths in two buckets
    cap_lens = torch.tensor([20, 1, 3, 17]).to(DEVICE)
    img_lens = torch.tensor([5, 1, 4]).to(DEVICE)
    opts = dict(queries=queries, direction=direction, norm="clipped_l2norm", lambda_softmax=9.0, agg="lse",
                lambda_lse=6.0)
    with forbid_host_reads(monkeypatch):
        values, indices = topk_triton.xattn_topk(img, cap, cap_lens, img_lens, 3, **opts)
    full = xattn_sim_op(img, cap, cap_lens, img_lens, direction, "clipped_l2norm", 9.0, "lse", 6.0, "triton", 0,
                        "ieee")
    full = full if queries == "images" else full.t()
    assert torch.equal(values, full.topk(3, dim=1).values)
    assert torch.equal(full.gather(1, indices), values)


@pytest.mark.skipif(KERNELS_HERE, reason="the kernel tests run in this process")
def test_kernel_tests_in_fresh_interpreter_process():
    run_kernel_tests_in_child(__file__, "1", no_skips=True)
