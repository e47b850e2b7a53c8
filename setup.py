"""Build of the compiled extension ``itm_kernels._C`` (C++ CPU kernels, plus CUDA kernels when available).

Install with the torch that is already in the environment (recommended; an isolated build would download torch):

    pip install --no-build-isolation .        # or: pip install --no-build-isolation -e .
    python setup.py build_ext --inplace       # development build next to the sources

Sources: csrc/module.cpp (the Python module, build_info), csrc/common/isa.cpp (the SIMD level) and every op's
csrc/<op>/cpu.cpp (each defines its own schema); csrc/common/ holds the shared headers. CUDA sources (csrc/<op>/cuda.cu; never the nvcc-only
compile_check.cu or the host emulate.cpp) join the build when torch has CUDA and nvcc is found; ITM_KERNELS_WITH_CUDA=1/0
forces either way. Compiler flags: -O3 -g0, OpenMP; no -march=native: each SIMD epilogue is compiled for AVX-512,
AVX2 + FMA and baseline x86-64 (target attributes: gcc >= 8, clang >= 7) and the level is picked per process
(ITM_KERNELS_ISA=avx512|avx2|baseline caps it at run time); other architectures build the portable code alone.
ITM_KERNELS_SIMD=baseline builds the baseline version alone (testing). MAX_JOBS bounds the parallel compile jobs.

Compilers: the C++ compiler is torch's choice, $CXX or c++ (gcc >= 8 or clang >= 7; CXX=clang++ for clang). OpenMP
(the kernels' threads, through ATen's parallel_for) is probed with a tiny program before the build: -fopenmp
(gcc: libgomp, torch's own runtime; clang on Linux: LLVM's libomp, Debian/Ubuntu package libomp-dev), on macOS
Apple clang's -Xpreprocessor -fopenmp with the libomp that torch ships (or Homebrew's). A compiler without OpenMP
stops the build with what to install, unless ITM_KERNELS_OPENMP=0 asks for a single-threaded build (build_info()
then says openmp: False). Verified: gcc 11.3 and 12.2, clang 14 (x86-64); gcc 12 cross-compiling for aarch64
(tools/cross_build_aarch64.sh). Not verified: macOS.
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = "csrc/*/cpu.cpp"
CUDA_SOURCES = "csrc/*/cuda.cu"


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda(torch, cuda_home) -> bool:
    flag = os.environ.get("ITM_KERNELS_WITH_CUDA", "").strip().lower()
    has_sources = bool(_rel(CUDA_SOURCES))
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not has_sources:
            raise RuntimeError(f"ITM_KERNELS_WITH_CUDA=1 but there are no {CUDA_SOURCES} sources")
        if torch.version.cuda is None or cuda_home is None:
            raise RuntimeError("ITM_KERNELS_WITH_CUDA=1 needs a CUDA build of torch and the CUDA toolkit (nvcc); "
                               f"torch {torch.__version__} has CUDA {torch.version.cuda}, CUDA_HOME={cuda_home}")
        return True
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))
    return has_sources and torch.version.cuda is not None and cuda_home is not None and bool(nvcc)


_OPENMP_PROBE = """#include <omp.h>
int main() {
  int n = 0;
#pragma omp parallel reduction(+ : n)
  n += omp_get_num_threads() > 0;
  return n > 0 ? 0 : 1;
}
"""


def _openmp_candidates(torch_dir: str) -> list[tuple[list[str], list[str]]]:
    """(compile flags, link flags) to try for OpenMP, in order."""
    found = [(["-fopenmp"], ["-fopenmp"])]
    if sys.platform == "darwin":  # Apple clang: no -fopenmp driver flag; torch's wheel ships libomp.dylib
        prefixes = [os.path.join(torch_dir, "lib")]
        prefixes += [os.path.join(p, "opt", "libomp", "lib") for p in ("/opt/homebrew", "/usr/local")]
        includes = [os.path.join(torch_dir, "include")]
        includes += [os.path.join(p, "opt", "libomp", "include") for p in ("/opt/homebrew", "/usr/local")]
        inc = [f"-I{d}" for d in includes if os.path.exists(os.path.join(d, "omp.h"))]
        for lib in prefixes:
            if os.path.exists(os.path.join(lib, "libomp.dylib")):
                found.append((["-Xpreprocessor", "-fopenmp"] + inc, [f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}"]))
    return found


def _openmp_flags(torch_dir: str) -> tuple[list[str], list[str]]:
    """The OpenMP flags that compile and link a small OpenMP program with this build's compiler ($CXX or c++,
    as torch.utils.cpp_extension picks it); ([], []) with ITM_KERNELS_OPENMP=0. Raises with what to install
    when none works."""
    flag = os.environ.get("ITM_KERNELS_OPENMP", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        print("itm_kernels: ITM_KERNELS_OPENMP=0: building WITHOUT OpenMP, every CPU kernel runs on one thread")
        return [], []
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    tried = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_probe.cpp")
        with open(src, "w") as f:
            f.write(_OPENMP_PROBE)
        for cflags, lflags in _openmp_candidates(torch_dir):
            cmd = cxx + cflags + [src, "-o", os.path.join(tmp, "omp_probe")] + lflags
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as exc:
                tried.append(f"{shlex.join(cmd)}: {exc}")
                continue
            if proc.returncode == 0:
                return cflags, lflags
            tried.append(f"{shlex.join(cmd)}:\n{proc.stderr.strip()[-600:]}")
    raise RuntimeError(
        "itm_kernels: the C++ compiler cannot build OpenMP code, which the CPU kernels' threads need.\n"
        "Fix: gcc (libgomp, as torch itself uses: CXX=g++), or for clang LLVM's OpenMP runtime (Debian/Ubuntu: "
        "apt-get install libomp-dev; macOS: brew install libomp); or ITM_KERNELS_OPENMP=0 for a single-threaded "
        "build.\nTried:\n" + "\n".join(tried))


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    omp_cflags, omp_lflags = _openmp_flags(os.path.dirname(torch.__file__))
    cxx = ["-O3", "-g0", *omp_cflags, "-fno-math-errno", "-fno-trapping-math", "-Wno-unknown-pragmas", "-Wno-psabi"]
    link = list(omp_lflags)
    sources = ["csrc/module.cpp", "csrc/common/isa.cpp"] + _rel(CPU_SOURCES)
    macros = []
    simd = os.environ.get("ITM_KERNELS_SIMD", "").strip().lower()
    if simd == "baseline":  # one portable version of every epilogue (testing; build_info() warns about it)
        macros.append(("ITM_SIMD_NO_DISPATCH", None))
    elif simd not in ("", "dispatch"):
        raise RuntimeError(f"ITM_KERNELS_SIMD={simd!r}: expected 'dispatch' (default) or 'baseline'")
    if _want_cuda(torch, CUDA_HOME):
        # SASS for sm_80 and sm_90, plus compute_90 PTX that newer GPUs JIT-compile (forward compatibility).
        nvcc = ["-O3", "-lineinfo", "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
        # Only csrc/<op>/cuda.cu: compile_check.cu instantiates the kernels for nvcc checks alone
        # (tools/compile_check_cuda.sh) and emulate.cpp is a host program.
        cuda_sources = _rel(CUDA_SOURCES)
        ext = CUDAExtension("itm_kernels._C", sources + cuda_sources,
                            include_dirs=[os.path.join(ROOT, "csrc")], define_macros=macros + [("ITM_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        ext = CppExtension("itm_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], define_macros=macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
