"""The one ``backend="auto"`` rule (itm_kernels._common.dispatch.choose_backend), for every op, on CUDA tensors
without a GPU: device availability and compute capability are monkeypatched, no kernel runs."""
import warnings

import pytest
import torch

from itm_kernels._common import dispatch

OPS = ("xattn_sim", "local_sim", "node_match")
CUDA = torch.device("cuda")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine with the CUDA extension, triton and an sm_90 GPU; an empty verified table; no warning yet."""
    monkeypatch.setattr(dispatch, "available_backends",
                        lambda device=None: ["cuda", "triton", "torch", "reference"] if
                        device is None or torch.device(device).type == "cuda" else ["cpu", "torch", "reference"])
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(dispatch, "VERIFIED_GPU_KERNELS", ())
    monkeypatch.setattr(dispatch, "_WARNED", set())
    return monkeypatch


def row(op, backend, capability=(9, 0), triton=None):
    return dict(op=op, backend=backend, capability=capability, torch=torch.__version__,
                triton=triton or dispatch.build_info_versions()["triton"], date="2026-12-04", device="H200")


def inputs(op, K=36, L=32, dtype=torch.float32):
    images, captions = torch.zeros(2, K, 8, dtype=dtype), torch.zeros(3, L, 8, dtype=dtype)
    return (images, captions, torch.zeros(4, 8)) if op == "local_sim" else (images, captions)


def test_shipped_table_is_empty():
    """No GPU has run these kernels: nothing may be listed as verified (benchmarks/RESULTS.md says the same)."""
    assert dispatch.VERIFIED_GPU_KERNELS == ()


@pytest.mark.parametrize("op", OPS)
def test_unverified_gpu_kernels_are_not_auto_and_warn_once(fake_gpu, op):
    with pytest.warns(RuntimeWarning, match="tools/gpu_check.py"):
        assert dispatch.choose_backend("auto", CUDA, op, inputs(op)) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.choose_backend("auto", CUDA, op, inputs(op)) == "torch"


@pytest.mark.parametrize("op", OPS)
def test_verified_kernel_is_auto_in_preference_order(fake_gpu, op):
    fake_gpu.setattr(dispatch, "VERIFIED_GPU_KERNELS", (row(op, "triton"),))
    assert dispatch.choose_backend("auto", CUDA, op, inputs(op)) == "triton"
    fake_gpu.setattr(dispatch, "VERIFIED_GPU_KERNELS", (row(op, "triton"), row(op, "cuda")))
    assert dispatch.choose_backend("auto", CUDA, op, inputs(op)) == "cuda"


@pytest.mark.parametrize("op", OPS)
def test_verified_on_another_capability_or_triton_version_does_not_count(fake_gpu, op):
    fake_gpu.setattr(dispatch, "VERIFIED_GPU_KERNELS", (row(op, "cuda", capability=(8, 0)),
                                                        row(op, "triton", triton="0.1.0")))
    with pytest.warns(RuntimeWarning):
        assert dispatch.choose_backend("auto", CUDA, op, inputs(op)) == "torch"


@pytest.mark.parametrize("op", OPS)
def test_supports_is_consulted_and_auto_falls_back(fake_gpu, op):
    """K = 100 is beyond every CUDA kernel's limit (K <= 64): auto takes the next verified backend, never raises."""
    fake_gpu.setattr(dispatch, "VERIFIED_GPU_KERNELS", (row(op, "cuda"),))
    assert dispatch.choose_backend("auto", CUDA, op, inputs(op, K=36)) == "cuda"
    assert dispatch.choose_backend("auto", CUDA, op, inputs(op, K=100)) == "torch"
    fake_gpu.setattr(dispatch, "VERIFIED_GPU_KERNELS", (row(op, "cuda"), row(op, "triton")))
    assert dispatch.choose_backend("auto", CUDA, op, inputs(op, K=100)) == "triton"


def test_node_match_triton_refuses_float64_under_auto(fake_gpu):
    fake_gpu.setattr(dispatch, "VERIFIED_GPU_KERNELS", (row("node_match", "triton"),))
    assert dispatch.choose_backend("auto", CUDA, "node_match", inputs("node_match", dtype=torch.float64)) == "torch"


@pytest.mark.parametrize("op", OPS)
def test_cpu_auto_and_named_backends(fake_gpu, op):
    cpu = torch.device("cpu")
    expected = "cpu" if dispatch.has_cpu_op(op) else "torch"
    assert dispatch.choose_backend("auto", cpu, op, inputs(op)) == expected
    assert dispatch.choose_backend("triton", CUDA, op, inputs(op)) == "triton"       # named: no table needed
    with pytest.raises(ValueError, match="not available for cpu tensors"):
        dispatch.choose_backend("cuda", cpu, op, inputs(op))
