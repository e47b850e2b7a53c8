"""No host syncs on the Triton path of xattn_sim (issue 16.4), checked on the CPU: the kernels run in the Triton
interpreter on CPU tensors, and Tensor.item / __int__ / __float__ / __bool__ / tolist / numpy / cpu — every way the
host reads a tensor — raise during the registered op's forward and backward (``xattn_sim_op`` on validated
inputs: the caller-facing wrapper's argument checks are outside this path). On a GPU, tools/gpu_check.py repeats it
with torch.cuda.set_sync_debug_mode("error") and a CUDA-graph capture of a training step."""
import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

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


@pytest.mark.skipif(KERNELS_HERE, reason="the kernel tests run in this process")
def test_kernel_tests_in_fresh_interpreter_process():
    run_kernel_tests_in_child(__file__, "1", no_skips=True)
