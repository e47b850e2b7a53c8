"""The CPU kernels at every SIMD level this machine can run, in one process, and the ``ITM_KERNELS_ISA`` switch.

Paths: ``_C._set_simd_level`` forces the level of OUR epilogues (AVX-512, AVX2 + FMA, baseline; capped at the CPU's
own level, so a level above it is skipped with the reason); oneDNN's brgemm keeps the level it started with in this
process (``.ci/run`` reruns the kernel test directories with ``ITM_KERNELS_ISA=avx2`` / ``baseline``, which also
caps oneDNN). Tolerances are per dtype and hold at every level: float64 1e-12; float32 2e-5 on cosines / unit
vectors (the levels differ only in the order of float32 sums: vector width and FMA contraction).
Padding is poisoned with NaN and Inf.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import itm_kernels
from itm_kernels._common.dispatch import load_extension
from itm_kernels.local_sim.reference import local_sim_reference
from itm_kernels.node_match.reference import node_match_reference
from itm_kernels.xattn_sim import reference as xattn_reference
from conftest import REPO, assert_close_report

_C = load_extension()
pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "_set_simd_level"),
                                reason="compiled extension (itm_kernels._C) with the SIMD switch not built")

LEVELS = ("avx512", "avx2", "baseline")
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _cpu_level() -> str:
    return itm_kernels.build_info()["simd_cpu"]


@pytest.fixture(params=LEVELS)
def level(request):
    """Runs the test at one forced level, restoring the process's level afterwards."""
    want = request.param
    if LEVELS.index(want) < LEVELS.index(_cpu_level()):
        pytest.skip(f"this CPU runs {_cpu_level()} at most ({itm_kernels.build_info()['simd_reason']})")
    before = itm_kernels.build_info()["simd"]
    got = _C._set_simd_level(want)
    assert got == want and itm_kernels.build_info()["simd"] == want
    yield want
    _C._set_simd_level(before)


def _poison(x: torch.Tensor, lens: torch.Tensor) -> None:
    """Padding rows (index >= length) of (N, L, d) become NaN / +Inf / -Inf."""
    for n in range(x.shape[0]):
        pad = x[n, int(lens[n]):]
        if pad.numel():
            pad[0::3] = float("nan")
            pad[1::3] = float("inf")
            pad[2::3] = -float("inf")


def _xattn_problem(seed, dtype, n_img=3, n_cap=5, K=7, L=9, d=37):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g, dtype=torch.float64), dim=-1)
    cap_lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    cap_lens[0], cap_lens[-1] = L, 1
    img_lens = torch.randint(1, K + 1, (n_img,), generator=g)
    img_lens[0] = K
    return img.to(dtype), cap.to(dtype), cap_lens, img_lens


def _poisoned(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    _poison(x, lens)
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("direction,norm,agg", [("t2i", "clipped_l2norm", "lse"), ("i2t", "softmax", "mean"),
                                                ("t2i", "l1norm", "max"), ("i2t", "no_norm", "sum")])
def test_xattn_sim_at_each_level(level, dtype, direction, norm, agg):
    img, cap, cap_lens, img_lens = _xattn_problem(1, dtype)
    opts = dict(img_lens=img_lens, direction=direction, norm=norm, agg=agg, lambda_softmax=9.0, lambda_lse=6.0)
    exact = xattn_reference.xattn_sim(img.double(), cap.double(), cap_lens, **opts)
    out = itm_kernels.xattn_sim(_poisoned(img, img_lens), _poisoned(cap, cap_lens), cap_lens, backend="cpu", **opts)
    assert_close_report(out, exact, atol=TOL[dtype], rtol=TOL[dtype], what=f"{level} {dtype} {direction} {norm}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_local_sim_at_each_level(level, dtype):
    g = torch.Generator().manual_seed(2)
    n_img, n_cap, K, L, d, s = 2, 4, 5, 7, 45, 19
    img = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g, dtype=torch.float64), dim=-1)
    lens = torch.tensor([L, 3, 1, 6])
    weight = torch.randn(s, d, generator=g, dtype=torch.float64) * (6.0 / (d + s)) ** 0.5
    bias = torch.randn(s, generator=g, dtype=torch.float64) * 0.1
    exact = local_sim_reference(img, cap, lens, weight, bias, lambda_softmax=9.0)
    cap_in = cap.to(dtype)
    _poison(cap_in, lens)
    out = itm_kernels.local_sim(img.to(dtype), cap_in, lens, weight.to(dtype), bias.to(dtype), lambda_softmax=9.0,
                                backend="cpu")
    assert_close_report(out, exact, atol=TOL[dtype], rtol=0, what=f"{level} {dtype} local_sim")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_node_match_at_each_level(level, dtype):
    g = torch.Generator().manual_seed(3)
    n_img, n_cap, K, L, d = 2, 3, 6, 5, 64
    img = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g, dtype=torch.float64), dim=-1)
    lens = torch.tensor([L, 2, 1])
    exact = node_match_reference(img, cap, lens, lambda_softmax=9.0)
    cap_in = cap.to(dtype)
    _poison(cap_in, lens)
    out = itm_kernels.node_match(img.to(dtype), cap_in, lens, lambda_softmax=9.0, backend="cpu")
    for name, got, want in zip(("region", "word"), out, exact):
        assert_close_report(got, want, atol=TOL[dtype], rtol=0, what=f"{level} {dtype} node_match {name}")


def test_bfloat16_is_widened_below_avx512(level):
    """Below the AVX-512 level (or without AVX512-BF16) no bfloat16 product runs natively: the kernels widen the
    bfloat16 inputs exactly to float32, so the result equals the float32 kernel's on the widened inputs."""
    info = itm_kernels.build_info()
    if level != "avx512":
        assert not info["native_bf16"] and info["bf16_gemm"] == "gemm-fp32-accumulate", info
    img, cap, cap_lens, img_lens = _xattn_problem(4, torch.bfloat16)
    img, cap = _poisoned(img, img_lens), _poisoned(cap, cap_lens)
    out = itm_kernels.xattn_sim(img, cap, cap_lens, img_lens=img_lens, backend="cpu")
    wide = itm_kernels.xattn_sim(img.float(), cap.float(), cap_lens, img_lens=img_lens, backend="cpu")
    tol = 0 if not info["native_bf16"] else 2e-5  # widened: the same float32 products; native: bf16 dot rounding
    assert_close_report(out, wide, atol=tol, rtol=0, what=f"{level} bfloat16 vs widened float32")


def _child_info(env_isa: str) -> tuple[dict, str]:
    code = ("import json, warnings; warnings.simplefilter('always'); import itm_kernels; "
            "print(json.dumps(itm_kernels.build_info()))")
    env = dict(os.environ, ITM_KERNELS_ISA=env_isa, PYTHONPATH=str(REPO))
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_env_switch_forces_the_level_and_caps_onednn():
    """ITM_KERNELS_ISA=baseline forces the baseline level at load, says why, and on x86 caps oneDNN at AVX2
    (brgemm has no lower kernels; other hosts have no x86 cap to set); bfloat16 then takes the widened path."""
    info, _ = _child_info("baseline")
    assert info["simd"] == "baseline", info
    assert "ITM_KERNELS_ISA=baseline" in info["simd_reason"], info["simd_reason"]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert info["onednn_max_cpu_isa"] == ("AVX2" if x86 else None), info
    assert info["native_bf16"] is False and info["bf16_gemm"] == "gemm-fp32-accumulate"


def test_env_switch_rejects_unknown_values_with_a_warning():
    info, err = _child_info("avx9000")
    assert info["simd_env_invalid"] and info["simd"] == info["simd_cpu"], info
    assert "ITM_KERNELS_ISA='avx9000' ignored" in err, err


def test_brgemm_shapes_stay_bounded():
    """xattn_sim quantises what it passes to brgemm (rows: multiples of 16 plus a tail below 16; columns: rounded
    up to 16 with zero columns; one row stride per call), so 100 calls with ragged caption lengths (over 60
    distinct word totals) ask for at most 39 + 4 shapes: i2t rows from {16, 32, ..., 384} and 1..15 at one
    column width, t2i one row count at 4 column widths. Unquantised, every distinct word total would be a new
    shape."""
    if not hasattr(_C, "_brgemm_shapes"):
        pytest.skip("extension without the brgemm shape counter")
    g = torch.Generator().manual_seed(5)
    n_img, K, d, L = 2, 4, 32, 40
    img = torch.randn(n_img, K, d, generator=g)
    _C._brgemm_shapes(reset=True, count=True)
    totals = set()
    try:
        for _ in range(100):
            n_cap = int(torch.randint(1, 12, (1,), generator=g))
            lens = torch.randint(1, L + 1, (n_cap,), generator=g)
            totals.add(int(lens.sum()))
            cap = torch.randn(n_cap, L, d, generator=g)
            for direction in ("t2i", "i2t"):
                itm_kernels.xattn_sim(img, cap, lens, direction=direction, backend="cpu")
        shapes = _C._brgemm_shapes(reset=True, count=False)
    finally:
        _C._brgemm_shapes(reset=True, count=False)
    assert len(totals) > 60
    assert 0 < shapes <= 39 + 4, shapes
