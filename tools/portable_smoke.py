"""Smoke test of a built ``itm_kernels._C`` on any host: the compiled CPU kernels against the float64 references.

    python tools/portable_smoke.py        # with the package to test first on PYTHONPATH

Prints ``build_info()``, then checks ``xattn_sim`` (t2i, i2t), ``local_sim`` and ``node_match`` on the "cpu"
backend (the compiled kernels, never the torch fallback: a missing extension fails) in float64 (tolerance 1e-12)
and float32 (2e-5), with NaN/Inf in the padding, and that bfloat16 equals the float32 kernel on the exactly widened
inputs where the CPU has no native bfloat16 dot product. On a non-x86 host it also checks that ``build_info()``
reports the portable path. Small shapes: seconds natively, about a minute under qemu-user
(tools/cross_build_aarch64.sh runs it there). Exits non-zero on the first failure.
"""
from __future__ import annotations

import json
import platform
import sys

import torch

import itm_kernels
from itm_kernels.local_sim.reference import local_sim_reference
from itm_kernels.node_match.reference import node_match_reference
from itm_kernels.xattn_sim import reference as xattn_reference

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _check(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = float((got.double() - want.double()).abs().max())
    ok = err <= tol and bool(torch.isfinite(got).all())
    print(f"  {what:<34} max |diff| {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")
    if not ok:
        raise SystemExit(f"portable_smoke: FAIL ({what})")


def _poisoned(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    for n in range(x.shape[0]):
        x[n, int(lens[n]):, 0::2] = float("nan")
        x[n, int(lens[n]):, 1::2] = float("inf")
    return x


def main() -> int:
    info = itm_kernels.build_info()
    print(json.dumps(info, indent=1))
    if info.get("cpu_backend") != "cpu":
        raise SystemExit(f"portable_smoke: FAIL (no compiled CPU kernels: {info.get('cpu_backend_reason')})")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        want = f"non-x86 host ({platform.machine()})"
        if info["simd"] != "baseline" or want not in info["simd_reason"] or info["native_bf16"]:
            raise SystemExit(f"portable_smoke: FAIL (build_info does not report the portable path: {info})")
    g = torch.Generator().manual_seed(0)
    K, L, d, s = 5, 7, 32, 9
    img64 = torch.nn.functional.normalize(torch.randn(3, K, d, generator=g, dtype=torch.float64), dim=-1)
    cap64 = torch.nn.functional.normalize(torch.randn(4, L, d, generator=g, dtype=torch.float64), dim=-1)
    lens = torch.tensor([L, 3, 1, 6])
    weight = torch.randn(s, d, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(s, generator=g, dtype=torch.float64) * 0.1
    for dtype in (torch.float64, torch.float32):
        img, cap = img64.to(dtype), _poisoned(cap64.to(dtype), lens)
        print(f"{dtype}:")
        for direction in ("t2i", "i2t"):
            out = itm_kernels.xattn_sim(img, cap, lens, direction=direction, backend="cpu")
            _check(f"xattn_sim {direction}", out, xattn_reference.xattn_sim(img64, cap64, lens, direction=direction),
                   TOL[dtype])
        out = itm_kernels.local_sim(img, cap, lens, weight.to(dtype), bias.to(dtype), lambda_softmax=9.0,
                                    backend="cpu")
        _check("local_sim", out, local_sim_reference(img64, cap64, lens, weight, bias, lambda_softmax=9.0),
               TOL[dtype])
        for name, got, want in zip(("region", "word"),
                                   itm_kernels.node_match(img, cap, lens, lambda_softmax=9.0, backend="cpu"),
                                   node_match_reference(img64, cap64, lens, lambda_softmax=9.0)):
            _check(f"node_match {name}", got, want, TOL[dtype])
    if not info["native_bf16"]:
        img, cap = img64.bfloat16(), _poisoned(cap64.bfloat16(), lens)
        print("torch.bfloat16 (widened to float32):")
        out = itm_kernels.xattn_sim(img, cap, lens, backend="cpu")
        _check("xattn_sim t2i vs float32 kernel", out,
               itm_kernels.xattn_sim(img.float(), cap.float(), lens, backend="cpu"), 0.0)
    print(f"portable_smoke: OK ({platform.machine()}, torch {torch.__version__}, {info['compiler']}, "
          f"simd {info['simd']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
