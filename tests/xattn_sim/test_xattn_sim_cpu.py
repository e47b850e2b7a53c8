"""Quick checks of the C++ CPU backend (``torch.ops.itm_kernels.xattn_sim_fwd``); the main suite: test_xattn_sim.py."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import itm_kernels
from itm_kernels.xattn_sim import reference
from itm_kernels._common.dispatch import load_extension

from conftest import assert_close_report, golden_path

pytestmark = pytest.mark.skipif("cpu" not in itm_kernels.available_backends("cpu"),
                                reason="compiled extension itm_kernels._C not built")

AGG_NAMES = {"LogSumExp": "lse", "Mean": "mean", "Max": "max", "Sum": "sum"}


def _inputs(n_img, k, n_cap, l_max, d, *, seed=0, garbage=1e3):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, k, d, generator=g, dtype=torch.float64), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, l_max, d, generator=g, dtype=torch.float64), dim=-1)
    cap_lens = torch.randint(1, l_max + 1, (n_cap,), generator=g)
    img_lens = torch.randint(1, k + 1, (n_img,), generator=g)
    cap_lens[0], img_lens[0] = l_max, k
    cap_lens[-1], img_lens[-1] = 1, 1
    for c in range(n_cap):
        cap[c, cap_lens[c]:] = garbage * torch.randn(l_max - cap_lens[c], d, generator=g, dtype=torch.float64)
    for i in range(n_img):
        img[i, img_lens[i]:] = garbage * torch.randn(k - img_lens[i], d, generator=g, dtype=torch.float64)
    return img, cap, cap_lens, img_lens


def test_build_info():
    info = itm_kernels.build_info()
    for key in ("cuda", "openmp", "openmp_threads", "simd", "bf16_brgemm", "compiler"):
        assert key in info, key
    assert info["simd"] in ("avx512", "avx2", "baseline")
    order = ("baseline", "avx2", "avx512")
    assert order.index(info["simd"]) <= order.index(info["simd_cpu"]), info["simd_reason"]
    assert info["simd_reason"]


def test_golden_scan_xattn():
    z = np.load(golden_path("scan_xattn.npz"))
    img, cap, lens = torch.tensor(z["img"]).double(), torch.tensor(z["cap"]).double(), torch.tensor(z["cap_lens"])
    for key in z.files:
        if "__" not in key or key.endswith("_fp32input"):
            continue
        parts = key.split("__")
        opts = dict(direction=parts[0], norm=parts[1], agg=AGG_NAMES[parts[2]], lambda_softmax=float(parts[3][3:]),
                    lambda_lse=float(parts[4][3:]) if len(parts) > 4 else 6.0)
        gold = torch.tensor(z[key])
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
            out = itm_kernels.xattn_sim(img.to(dtype), cap.to(dtype), lens, backend="cpu", **opts)
            assert out.dtype == dtype
            assert_close_report(out, gold, atol=tol, rtol=tol, what=f"{key} {dtype}")


@pytest.mark.parametrize("shape", [(5, 7, 9, 6, 33), (1, 1, 1, 1, 1), (3, 36, 4, 24, 59), (4, 3, 2, 1, 17)])
def test_matches_reference_every_option(shape):
    img, cap, cap_lens, img_lens = _inputs(*shape)
    for direction, norm, agg in itertools.product(reference.DIRECTIONS, reference.NORMS, reference.AGGS):
        opts = dict(direction=direction, norm=norm, lambda_softmax=4.0, agg=agg, lambda_lse=5.0)
        want = reference.xattn_sim(img, cap, cap_lens, img_lens=img_lens, **opts)
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
            got = itm_kernels.xattn_sim(img.to(dtype), cap.to(dtype), cap_lens, img_lens=img_lens, backend="cpu",
                                        **opts)
            assert_close_report(got, want, atol=tol, rtol=tol, what=f"{shape} {direction} {norm} {agg} {dtype}")


def test_tiling_and_padding_do_not_matter():
    img, cap, cap_lens, img_lens = _inputs(11, 9, 23, 13, 40, seed=1)
    nan_img, nan_cap = img.clone(), cap.clone()
    for c in range(cap.shape[0]):
        nan_cap[c, cap_lens[c]:] = float("nan")
    for i in range(img.shape[0]):
        nan_img[i, img_lens[i]:] = float("inf")
    for direction, dtype in itertools.product(reference.DIRECTIONS, (torch.float32, torch.bfloat16, torch.float64)):
        opts = dict(direction=direction, norm="clipped_l2norm", lambda_softmax=9.0, agg="lse", lambda_lse=6.0)
        base = itm_kernels.xattn_sim(img.to(dtype), cap.to(dtype), cap_lens, img_lens=img_lens, backend="cpu", **opts)
        tiny = itm_kernels.xattn_sim(img.to(dtype), cap.to(dtype), cap_lens, img_lens=img_lens, backend="cpu",
                                     max_tile_bytes=1, **opts)
        padded = itm_kernels.xattn_sim(nan_img.to(dtype), nan_cap.to(dtype), cap_lens, img_lens=img_lens,
                                       backend="cpu", **opts)
        # Tiling never changes an operation's inputs, except bfloat16 on CPUs without a native bfloat16 dot product
        # (bf16_gemm "gemm-fp32-accumulate": widened float32 products, whose accumulation order follows the tile
        # widths): there 1e-6 (a few float32 ulps of the O(1) scores); everywhere else 1e-14.
        plain_bf16 = dtype == torch.bfloat16 and itm_kernels.build_info().get("bf16_gemm") != "brgemm-vnni"
        tol = 1e-6 if plain_bf16 else 1e-14
        assert_close_report(tiny, base, atol=tol, rtol=tol, what=f"tiling {direction} {dtype}")
        assert torch.equal(padded, base), f"padding changed the result ({direction}, {dtype})"


def test_bfloat16_within_twice_pytorch_error():
    img, cap, cap_lens, img_lens = _inputs(4, 10, 9, 13, 59, seed=2)
    img, cap = img.bfloat16(), cap.bfloat16()
    for direction, norm in itertools.product(reference.DIRECTIONS, ("clipped_l2norm", "softmax", "l1norm")):
        opts = dict(direction=direction, norm=norm, lambda_softmax=9.0, agg="lse", lambda_lse=6.0)
        truth = reference.xattn_sim(img.double(), cap.double(), cap_lens, img_lens=img_lens, **opts)
        torch_err = (reference.xattn_sim(img, cap, cap_lens, img_lens=img_lens, compute_dtype=torch.bfloat16,
                                         **opts).double() - truth).abs().max().item()
        out = itm_kernels.xattn_sim(img, cap, cap_lens, img_lens=img_lens, backend="cpu", **opts)
        assert out.dtype == torch.float32
        assert (out.double() - truth).abs().max().item() <= 2 * torch_err


def test_float16_and_odd_feature_sizes():
    for d in (1, 2, 3):
        img, cap, cap_lens, img_lens = _inputs(3, 4, 5, 6, d, seed=3)
        for dtype, direction in itertools.product((torch.float16, torch.bfloat16), reference.DIRECTIONS):
            opts = dict(direction=direction, norm="clipped_l2norm", lambda_softmax=9.0, agg="mean", lambda_lse=6.0)
            want = reference.xattn_sim(img.to(dtype).double(), cap.to(dtype).double(), cap_lens, img_lens=img_lens,
                                       **opts)
            got = itm_kernels.xattn_sim(img.to(dtype), cap.to(dtype), cap_lens, img_lens=img_lens, backend="cpu",
                                        **opts)
            assert got.dtype == torch.float32
            assert_close_report(got, want, atol=2e-5, rtol=2e-5, what=f"d={d} {dtype} {direction}")


def test_opcheck():
    load_extension()
    img, cap, cap_lens, img_lens = _inputs(3, 4, 5, 6, 8, seed=4)
    for dtype in (torch.float32, torch.float64):
        args = (img.to(dtype), cap.to(dtype), cap_lens, img_lens, 1, 2, 4.0, 0, 5.0, 0)
        torch.library.opcheck(torch.ops.itm_kernels.xattn_sim_fwd.default, args)


def test_bad_inputs_raise():
    load_extension()
    op = torch.ops.itm_kernels.xattn_sim_fwd
    img, cap = torch.randn(3, 4, 8), torch.randn(5, 6, 8)
    good = [img, cap, torch.tensor([1, 6, 3, 2, 4]), torch.tensor([4, 1, 2]), 0, 2, 9.0, 0, 6.0, 0]
    assert op(*good).shape == (3, 5)
    bad = [(0, torch.randn(3, 4)), (1, torch.randn(5, 6, 7)), (1, cap.double()), (0, img.int()),
           (0, torch.randn(3, 8, 4).transpose(1, 2)), (2, torch.tensor([1, 7, 3, 2, 4])),
           (2, torch.tensor([0, 6, 3, 2, 4])), (2, torch.tensor([1, 6, 3])), (2, torch.tensor([1, 6, 3, 2, 4]).int()),
           (3, torch.tensor([5, 1, 2])), (3, torch.tensor([[4, 1, 2]])), (4, 2), (5, 7), (5, -1), (7, 4),
           (6, float("nan")), (8, float("inf")), (8, 0.0), (9, -1)]
    for index, value in bad:
        args = list(good)
        args[index] = value
        with pytest.raises(RuntimeError):
            op(*args)
