"""Scaffolding shared by the kernel tests (tests/<op>/test_<op>_triton.py and test_<op>_cuda.py): repository paths,
the Triton mode of this process, re-running a module's kernel tests in a child pytest, and building a CUDA host
emulator with tools/compile_check_cuda.sh. Importable as ``from kernel_helpers import ...`` because tests/ is on
sys.path (pytest's default "prepend" import mode puts conftest.py's directory there).

Nothing here imports triton at import time: the Triton test modules set TRITON_INTERPRET before their first triton
import and only then call :func:`triton_mode`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CUDA_CHECK_SCRIPT = REPO / "tools" / "compile_check_cuda.sh"
TRITON_TOOL = REPO / "tools" / "compile_check_triton.py"
# dtype codes of the CUDA emulators' input headers.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def triton_mode() -> SimpleNamespace:
    """How this process runs Triton kernels: INTERPRET (interpreter, CPU tensors), DEVICE ("cpu" or "cuda"),
    KERNELS_HERE (whether kernel tests can run in this process) and the ``needs_kernels`` skip mark."""
    from itm_kernels._common import triton_utils

    interpret = triton_utils.interpreted() and triton_utils.triton_imported_interpreted()
    here = interpret or (torch.cuda.is_available() and not triton_utils.interpreted()
                         and not triton_utils.triton_imported_interpreted())
    needs = pytest.mark.skipif(
        not here, reason="needs a CUDA device or TRITON_INTERPRET=1 before triton's first import; triton was "
                         "imported earlier, so test_kernel_tests_in_fresh_interpreter_process runs these")
    return SimpleNamespace(INTERPRET=interpret, DEVICE="cpu" if interpret else "cuda", KERNELS_HERE=here,
                           needs_kernels=needs)


def run_kernel_tests_in_child(test_file: str, interpret: str, *, marks: str | None = None,
                              no_skips: bool = False) -> None:
    """Run ``test_file``'s kernel tests (not the compile check, not the re-run itself) in a child pytest with
    TRITON_INTERPRET=``interpret``; assert they passed (and, with ``no_skips``, that none was skipped)."""
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    cmd = [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-p", "no:cacheprovider"]
    if marks is not None:
        cmd += ["-m", marks]
    cmd += ["-k", "not compiles_for and not in_fresh"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"kernel tests failed in the child process:\n{tail}"
    assert " passed" in tail, tail
    if no_skips:
        assert "skipped" not in tail.strip().splitlines()[-1], tail


def build_emulator(tmp_path_factory, only: str, flag: str, name: str, *, nvcc: bool = False):
    """Run tools/compile_check_cuda.sh --only ``only`` keeping the emulator binary (``flag`` PATH); returns
    (completed process, emulator path). ``nvcc=False`` (the emulator tests, default run) passes ``--no-nvcc``: the
    host checks and the emulator only, seconds instead of ~40 s of nvcc per kernel; the nvcc compile checks
    (``nvcc=True``) are ``slow`` tests, and CI runs the whole script. Skips without nvcc (it locates the CUDA
    headers the emulator includes) and g++."""
    if shutil.which("nvcc") is None or shutil.which("g++") is None:
        pytest.skip("needs nvcc and g++")
    emulator = tmp_path_factory.mktemp(f"cuda_{name}") / f"{name}_emulate"
    cmd = ["bash", str(CUDA_CHECK_SCRIPT), "--only", only, flag, str(emulator)] + ([] if nvcc else ["--no-nvcc"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc, emulator


def built_emulator(compile_check) -> Path:
    """The emulator of a :func:`build_emulator` result; fails the test if it was not built."""
    proc, path = compile_check
    if proc.returncode != 0 or not path.exists():
        pytest.fail(f"emulator not built:\n{proc.stdout}\n{proc.stderr}")
    return path


def _raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes as the emulators read them: contiguous, float16/bfloat16 as their 16-bit patterns."""
    t = t.contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def run_emulator(emulator: Path, tmp_path: Path, header: bytes, tensors, *, float64: bool):
    """Run a CUDA host emulator on ``header`` + the raw bytes of ``tensors`` (in that order); returns its flat
    output (float64 if ``float64`` else float32, as a tensor) and its stdout. Fails the test if it exits non-zero."""
    import numpy as np

    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    inp.write_bytes(header + b"".join(_raw_bytes(t) for t in tensors))
    proc = subprocess.run([str(emulator), str(inp), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"emulator failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return torch.from_numpy(np.fromfile(out, dtype=np.float64 if float64 else np.float32)), proc.stdout


def check_compile_output(proc, prefix: str, kernels: int, *, no_spill: bool = True) -> None:
    """Assert that a compile_check_cuda.sh run passed with ``kernels`` kernels for sm_80 and sm_90 (lines
    ``{prefix}{arch}: OK {kernels} kernels``), without spills or stack where ``no_spill``."""
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout}\n{proc.stderr}"
    for arch in ("sm_80", "sm_90"):
        line = next((x for x in proc.stdout.splitlines() if x.startswith(f"{prefix}{arch}: ")), "")
        assert line.startswith(f"{prefix}{arch}: OK {kernels} kernels"), proc.stdout
        if no_spill:
            assert " 0 bytes spilled in total, stack <= 0 bytes" in line, line
    assert "compile check passed" in proc.stdout
