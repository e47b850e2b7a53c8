"""What ``build_info()`` says about the CPU path, and the torch fallback where the compiled extension is missing.

- With ``itm_kernels._C``: CPU tensors run the compiled kernels (``cpu_backend`` "cpu"); an x86-64 build with
  runtime dispatch says so, and a non-x86 build (aarch64 Linux, macOS arm64) runs the portable code and names the
  host in ``simd_reason``.
- Without it (simulated in a child process by blocking the import of ``itm_kernels._C``, as on a host where it
  did not build): ``backend="auto"`` runs the "torch" backend on CPU tensors, ``build_info()`` reports
  ``cpu_backend`` "torch" with the import error, and the import warns once. The fallback's results are checked
  against the float64 reference (tolerance 1e-12: the same float64 products in another order).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

import itm_kernels
from conftest import REPO

_X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_build_info_names_the_cpu_path():
    info = itm_kernels.build_info()
    if not info["extension"]:
        assert info["cpu_backend"] == "torch" and info["extension_error"], info
        assert "could not be imported" in info["cpu_backend_reason"], info
        pytest.skip(f"compiled extension not importable here: {info['extension_error']}")
    assert info["cpu_backend"] == "cpu" and "cpu" in info["backends"], info
    if _X86:
        dispatch_build = info["simd_dispatch"].startswith("runtime")
        assert dispatch_build or "baseline-only build" in info["simd_reason"], info
    else:
        assert info["simd"] == info["simd_cpu"] == "baseline", info
        assert info["simd_dispatch"] == "none: portable code", info
        assert f"non-x86 host ({platform.machine()})" in info["simd_reason"], info
        assert info["native_bf16"] is False and info["bf16_gemm"] == "gemm-fp32-accumulate", info


_CHILD = r"""
import json, sys, warnings
sys.modules["itm_kernels._C"] = None  # the import of the compiled extension now fails, as where it did not build
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import itm_kernels
import torch
from itm_kernels.local_sim.reference import local_sim_reference
from itm_kernels.node_match.reference import node_match_reference
from itm_kernels.xattn_sim import reference as xattn_reference

g = torch.Generator().manual_seed(0)
img = torch.nn.functional.normalize(torch.randn(2, 5, 32, generator=g, dtype=torch.float64), dim=-1)
cap = torch.nn.functional.normalize(torch.randn(3, 6, 32, generator=g, dtype=torch.float64), dim=-1)
lens = torch.tensor([6, 2, 1])
cap[1, 2:] = float("nan")
cap[2, 1:] = float("inf")
clean = cap.nan_to_num(0.0, 0.0, 0.0)
weight = torch.randn(7, 32, generator=g, dtype=torch.float64) * 0.3
bias = torch.randn(7, generator=g, dtype=torch.float64) * 0.1
err = {}
for direction in ("t2i", "i2t"):
    out = itm_kernels.xattn_sim(img, cap, lens, direction=direction)
    ref = xattn_reference.xattn_sim(img, clean, lens, direction=direction)
    err["xattn_sim_" + direction] = float((out - ref).abs().max())
out = itm_kernels.local_sim(img, cap, lens, weight, bias, lambda_softmax=9.0)
err["local_sim"] = float((out - local_sim_reference(img, clean, lens, weight, bias, lambda_softmax=9.0)).abs().max())
for name, got, want in zip(("region", "word"), itm_kernels.node_match(img, cap, lens, lambda_softmax=9.0),
                           node_match_reference(img, clean, lens, lambda_softmax=9.0)):
    err["node_match_" + name] = float((got - want).abs().max())
try:
    itm_kernels.xattn_sim(img, cap, lens, backend="cpu")
    named_cpu = "ran"
except ValueError as exc:
    named_cpu = str(exc)
print(json.dumps({"info": itm_kernels.build_info(), "cpu_backends": itm_kernels.available_backends("cpu"),
                  "warnings": [str(w.message) for w in caught], "err": err, "named_cpu": named_cpu}))
"""


def test_torch_fallback_without_the_extension_is_reported_and_correct():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # conftest's setting would list the interpreted "triton" for CPU tensors
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    info = res["info"]
    assert info["extension"] is False and "itm_kernels._C" in info["extension_error"], info
    assert info["cpu_backend"] == "torch", info
    assert info["cpu_backend_reason"].startswith("torch fallback: itm_kernels._C could not be imported"), info
    assert "simd" not in info, info  # no compiled epilogues: no SIMD level to report
    assert res["cpu_backends"] == ["torch", "reference"], res
    assert "not available for cpu tensors" in res["named_cpu"], res["named_cpu"]
    fallback_warnings = [w for w in res["warnings"] if "could not be imported" in w]
    assert len(fallback_warnings) == 1 and "'torch' backend" in fallback_warnings[0], res["warnings"]
    for name, e in res["err"].items():
        assert e <= 1e-12, (name, e)
