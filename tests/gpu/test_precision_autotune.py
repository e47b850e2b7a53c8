"""The ``precision=`` keyword of xattn_sim (float32 tl.dot precision of the Triton backend) and the autotune
table of its compiled forward: pure-Python checks of what reaches the kernel; the numerics of "tf32"/"tf32x3" and
the tuned configs need a GPU (tools/gpu_check.py)."""
import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import itm_kernels  # noqa: E402
from itm_kernels._common.precision import PRECISIONS, resolve_precision  # noqa: E402
from itm_kernels.xattn_sim import triton as xattn_triton  # noqa: E402


@pytest.fixture
def tf32_flag():
    old = torch.backends.cuda.matmul.allow_tf32

    def set_flag(value):
        torch.backends.cuda.matmul.allow_tf32 = value
    yield set_flag
    torch.backends.cuda.matmul.allow_tf32 = old


def test_resolve_precision(tf32_flag):
    tf32_flag(False)
    assert resolve_precision(None) == "ieee"
    tf32_flag(True)
    assert resolve_precision(None) == "tf32"
    for p in PRECISIONS:
        assert resolve_precision(p) == p
    for bad in ("fp16", "IEEE", 3):
        with pytest.raises(ValueError, match="precision"):
            resolve_precision(bad)


def test_public_function_rejects_bad_precision():
    with pytest.raises(ValueError, match="precision"):
        itm_kernels.xattn_sim(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), [2], precision="half")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_reaches_the_compiled_float32_kernel_only(precision):
    kw = dict(block_c=64, block_q=16, n_qry=100, d=1024, norm="clipped_l2norm", agg="lse", precision=precision)
    assert xattn_triton.kernel_config(torch.float32, **kw)[0]["DOT_PRECISION"] == precision
    assert xattn_triton.kernel_config(torch.bfloat16, **kw)[0]["DOT_PRECISION"] == "ieee"
    assert xattn_triton.kernel_config(torch.float64, **kw)[0]["DOT_PRECISION"] == "ieee"
    assert xattn_triton.kernel_config(torch.float32, interpret=True, **kw)[0]["DOT_PRECISION"] == "ieee"
    bwd = xattn_triton.bwd_config(torch.float32, block_c=64, block_q=16, d=1024, norm="l2norm", agg="max",
                                  outer_ctx=True, precision=precision)[0]
    assert bwd["DOT_PRECISION"] == precision


def test_precision_is_passed_from_the_public_function(monkeypatch, tf32_flag):
    if "triton" not in itm_kernels.available_backends("cpu"):
        pytest.skip("triton backend not offered for CPU tensors in this process")
    seen = []
    monkeypatch.setattr(xattn_triton, "xattn_sim", lambda *a, precision, **k: seen.append(precision) or
                        torch.zeros(a[0].shape[0], a[1].shape[0]))
    itm_kernels.xattn_sim(torch.randn(2, 3, 4), torch.randn(2, 3, 4), [3, 1], backend="triton", precision="tf32x3")
    tf32_flag(False)
    itm_kernels.xattn_sim(torch.randn(2, 3, 4), torch.randn(2, 3, 4), [3, 1], backend="triton")
    assert seen == ["tf32x3", "ieee"]


def test_autotune_table():
    for kind, configs in xattn_triton.AUTOTUNE_CONFIGS.items():
        assert len(configs) >= 4 and all(c["BLOCK_D"] >= 16 and c["num_warps"] in (4, 8) for c in configs)
    arg_names = xattn_triton._xattn_sim_kernel.__code__.co_varnames
    assert set(xattn_triton.AUTOTUNE_KEY) <= set(arg_names)
    assert xattn_triton._autotune_kind(torch.float64) is None          # float64 runs the one untuned config
    tuner = xattn_triton.autotuned_kernel("lowp")
    assert len(tuner.configs) == len(xattn_triton.AUTOTUNE_CONFIGS["lowp"])


# ------------------------------------------------------------------------------------------------------------------
# local_sim and node_match: the same keyword and rules
# ------------------------------------------------------------------------------------------------------------------

from itm_kernels._common import triton_utils  # noqa: E402
from itm_kernels.local_sim import triton as local_sim_triton  # noqa: E402
from itm_kernels.node_match import triton as node_match_triton  # noqa: E402


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_reaches_the_compiled_float32_local_sim_and_node_match_kernels_only(precision):
    for dtype, interpret, expected in ((torch.float32, False, precision), (torch.bfloat16, False, "ieee"),
                                       (torch.float16, False, "ieee"), (torch.float32, True, "ieee")):
        c, _ = local_sim_triton.kernel_config(dtype, K=36, bucket=32, s=256, interpret=interpret,
                                              precision=precision)
        assert c["DOT_PRECISION"] == expected, (dtype, interpret)
        c, _ = node_match_triton.kernel_config(dtype, K=36, block_l=32, d=1024, num_blocks=16, interpret=interpret,
                                               precision=precision)
        assert c["DOT_PRECISION"] == expected, (dtype, interpret)
    # The fused backward widens its loads to float32: every dtype's products follow precision on a GPU.
    for dtype in (torch.float32, torch.bfloat16):
        c, _ = local_sim_triton.bwd_config(dtype, block_c=64, block_q=32, block_s=256, outer_ctx=True,
                                           precision=precision)
        assert c["DOT_PRECISION"] == precision
    assert local_sim_triton.bwd_config(torch.float64, block_c=64, block_q=32, block_s=256, outer_ctx=True,
                                       precision=precision)[0]["DOT_PRECISION"] == "ieee"
    with pytest.raises(ValueError, match="precision"):
        triton_utils.dot_precision(torch.float32, False, "half")


def test_public_functions_pass_precision(monkeypatch, tf32_flag):
    if "triton" not in itm_kernels.available_backends("cpu"):
        pytest.skip("triton backend not offered for CPU tensors in this process")
    seen = []

    def fake_local_sim(images, captions, cap_lens, weight, bias, *, lambda_softmax, direction, precision):
        seen.append(("local_sim", direction, precision))
        rows = captions.shape[1] if direction == "t2i" else images.shape[1]
        return torch.zeros(images.shape[0], captions.shape[0], rows, weight.shape[0])

    def fake_node_match(images, captions, cap_lens, *, lambda_softmax, num_blocks, precision):
        seen.append(("node_match", precision))
        return (torch.zeros(images.shape[0], captions.shape[0], images.shape[1], num_blocks),
                torch.zeros(images.shape[0], captions.shape[0], captions.shape[1], num_blocks))
    monkeypatch.setattr(local_sim_triton, "local_sim_triton", fake_local_sim)
    monkeypatch.setattr(node_match_triton, "node_match_triton", fake_node_match)
    img, cap, w, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    itm_kernels.local_sim(img, cap, [3, 1], w, b, backend="triton", precision="tf32x3")
    itm_kernels.local_sim(img, cap, [3, 1], w, b, backend="triton", precision="tf32", direction="i2t")
    itm_kernels.node_match(img, cap, [3, 1], num_blocks=2, backend="triton", precision="tf32")
    tf32_flag(False)
    itm_kernels.node_match(img, cap, [3, 1], num_blocks=2, backend="triton")
    assert seen == [("local_sim", "t2i", "tf32x3"), ("local_sim", "i2t", "tf32"), ("node_match", "tf32"),
                    ("node_match", "ieee")]
    with pytest.raises(ValueError, match="precision"):
        itm_kernels.local_sim(img, cap, [3, 1], w, b, backend="triton", precision="fp8")
    with pytest.raises(ValueError, match="precision"):
        itm_kernels.node_match(img, cap, [3, 1], num_blocks=2, backend="triton", precision="fp8")


def test_local_sim_and_node_match_autotune_tables():
    lsk = local_sim_triton._local_sim_kernel.__code__.co_varnames
    assert set(local_sim_triton.AUTOTUNE_KEY) <= set(lsk)
    assert all(p["BLOCK_D"] >= 16 for p in local_sim_triton.AUTOTUNE_PARAMS)
    assert len(local_sim_triton.autotuned_kernel().configs) == len(local_sim_triton.AUTOTUNE_PARAMS) * 2 * 2
    nmk = node_match_triton._node_match_kernel.__code__.co_varnames
    assert set(node_match_triton.AUTOTUNE_KEY) <= set(nmk)
    assert len(node_match_triton.autotuned_kernel().configs) == \
        len(node_match_triton.AUTOTUNE_WARPS) * len(node_match_triton.AUTOTUNE_STAGES)
