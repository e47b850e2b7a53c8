"""Which backends this install has, and the ONE rule that resolves ``backend="auto"`` for every op."""
from __future__ import annotations

import functools
import os

import torch

_C_IMPORT_ERROR: str | None = None


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import the compiled extension ``itm_kernels._C`` (registers the ``torch.ops.itm_kernels`` ops), or None."""
    global _C_IMPORT_ERROR
    try:
        from .. import _C  # noqa: F401
    except ImportError as exc:  # a source checkout before the build, or a build that cannot load here
        _C_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        import warnings

        warnings.warn(f"itm_kernels: the compiled extension itm_kernels._C could not be imported "
                      f"({_C_IMPORT_ERROR}); CPU tensors run the chunked 'torch' backend, several times slower. "
                      f"Build it: pip install --no-build-isolation . (or python setup.py build_ext --inplace)",
                      RuntimeWarning, stacklevel=3)
        return None
    _warn_simd(_C)
    return _C


def _warn_simd(ext) -> None:
    """Warn once where the CPU epilogues cannot reach this CPU's level: an x86-64 build without runtime SIMD
    dispatch (``ITM_KERNELS_SIMD=baseline`` or a compiler without target attributes), a build without OpenMP
    (one thread), or an ``ITM_KERNELS_ISA`` value that is not understood (ignored)."""
    import platform
    import warnings

    info = ext.build_info()
    if info.get("openmp") is False:
        warnings.warn("itm_kernels: the compiled extension was built without OpenMP (ITM_KERNELS_OPENMP=0): every CPU "
                      "kernel runs on one thread", RuntimeWarning, stacklevel=3)
    if info.get("simd_env_invalid"):
        warnings.warn(f"itm_kernels: {info.get('simd_reason')}", RuntimeWarning, stacklevel=3)
    dispatch = str(info.get("simd_dispatch", ""))
    if dispatch.startswith("none") and platform.machine().lower() in ("x86_64", "amd64"):
        warnings.warn(f"itm_kernels: {info.get('simd_reason')}; the fused CPU kernels run several times slower than "
                      "a build with runtime dispatch (rebuild without ITM_KERNELS_SIMD=baseline, gcc >= 8 or "
                      "clang >= 7)", RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _probe() -> dict:
    ext = load_extension()
    return {
        "cpu": ext is not None and hasattr(torch.ops.itm_kernels, "xattn_sim_fwd"),
        "cuda": ext is not None and bool(ext.build_info().get("cuda", False)) and torch.cuda.is_available(),
        "triton": triton_importable(),
        "gpu": torch.cuda.is_available(),
    }


# Probed once at import, so that torch.compile traces plain constants here rather than an import.
_HAVE = _probe()


def has_cpu_kernels() -> bool:
    return _HAVE["cpu"]


def has_cuda_kernels() -> bool:
    return _HAVE["cuda"]


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: every device this machine has), in preference order.

    "reference" and "torch" are always there; "cpu" needs the compiled extension; "triton" needs triton and a
    CUDA device (or ``TRITON_INTERPRET=1`` for CPU tensors); "cuda" needs the extension built with CUDA.
    """
    kind = None if device is None else torch.device(device).type
    names = []
    if kind in (None, "cuda"):
        if has_cuda_kernels():
            names.append("cuda")
        if _HAVE["triton"] and (_HAVE["gpu"] or triton_interpreted()):
            names.append("triton")
    if kind in (None, "cpu"):
        if has_cpu_kernels():
            names.append("cpu")
        if kind == "cpu" and _HAVE["triton"] and triton_interpreted():
            names.append("triton")
    names += ["torch", "reference"]
    return list(dict.fromkeys(names))


def build_info() -> dict:
    """What this install has: versions, compiled-extension flags, backends.

    Always: ``cpu_backend`` ("cpu": the compiled kernels run CPU tensors; "torch": the chunked PyTorch fallback,
    only where the compiled extension ``itm_kernels._C`` cannot be imported) and ``cpu_backend_reason`` (with the
    import error). With the compiled extension: ``simd`` (the level the CPU epilogues run at: "avx512", "avx2" or
    "baseline"; non-x86 builds run the portable code at "baseline", with a reason naming the host),
    ``simd_reason`` (why: CPU detection, the ``ITM_KERNELS_ISA`` override, or a build without dispatch),
    ``simd_cpu`` (the CPU's own level), ``simd_dispatch``, ``native_bf16`` (AVX512-BF16 in use: bfloat16 products
    run natively; otherwise they are widened to float32), ``bf16_gemm``, ``onednn_max_cpu_isa``, ``openmp``,
    ``openmp_runtime`` ("libgomp" or "libomp", the OpenMP ABI the build calls), ``cuda``, ``compiler``.
    """
    ext = load_extension()
    if has_cpu_kernels():
        cpu_reason = "compiled kernels (itm_kernels._C)"
    elif ext is None:
        cpu_reason = f"torch fallback: itm_kernels._C could not be imported ({_C_IMPORT_ERROR})"
    else:
        cpu_reason = "torch fallback: itm_kernels._C is loaded but registers no CPU kernels (an older build)"
    info = {
        "torch": torch.__version__,
        "extension": ext is not None,
        "extension_error": _C_IMPORT_ERROR,
        "cpu_backend": "cpu" if has_cpu_kernels() else "torch",
        "cpu_backend_reason": cpu_reason,
        "triton": None,
        "cuda_available": torch.cuda.is_available(),
        "backends": available_backends(),
    }
    if triton_importable():
        import triton

        info["triton"] = triton.__version__
    if ext is not None:
        info.update(ext.build_info())
    return info


# ---------------------------------------------------------------------------------------------------------------
# The one "auto" rule (every op: xattn_sim, local_sim, node_match)
# ---------------------------------------------------------------------------------------------------------------
# Preference order of "auto" by device type. On CUDA tensors a GPU kernel ("cuda", "triton") is a candidate only
# when VERIFIED_GPU_KERNELS lists it for the device's compute capability; "torch" (chunked, cuBLAS) always is.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
GPU_BACKENDS = ("cuda", "triton")

# GPU kernels that passed ``python tools/gpu_check.py`` on a device class, as written by that tool's
# ``--record`` output: {"op", "backend", "capability": (major, minor), "torch", "triton", "date", "device"}.
# An entry enables "auto" for that (op, backend) on GPUs of that compute capability, provided the running
# triton has the recorded major.minor version (a Triton entry is a statement about one compiler). EMPTY: no GPU has
# run any kernel of this package yet (see benchmarks/RESULTS.md), so "auto" runs "torch" on every GPU.
VERIFIED_GPU_KERNELS: tuple[dict, ...] = ()

# The compiled CPU op each op's "cpu" backend needs (an older extension may lack it).
CPU_OPS = {"xattn_sim": "xattn_sim_fwd", "local_sim": "local_sim_cpu_", "node_match": "node_match_fused_"}
OPS = tuple(CPU_OPS)

_WARNED: set = set()


def has_cpu_op(op: str) -> bool:
    """Whether the "cpu" backend of ``op`` can run: the compiled extension with that op's CPU kernel."""
    return has_cpu_kernels() and hasattr(torch.ops.itm_kernels, CPU_OPS[op])


def _major_minor(version: str | None) -> str | None:
    return None if version is None else ".".join(version.split("+")[0].split(".")[:2])


def device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device (a property query: no sync)."""
    return tuple(torch.cuda.get_device_capability(device))


def is_verified(op: str, backend: str, capability: tuple[int, int], table=None) -> bool:
    """Whether ``table`` (default ``VERIFIED_GPU_KERNELS``) lists ``op``'s ``backend`` kernel as verified on
    GPUs of ``capability``, under this install's triton major.minor for a Triton kernel."""
    table = VERIFIED_GPU_KERNELS if table is None else table
    triton_now = _major_minor(build_info_versions()["triton"])
    for row in table:
        if (row["op"], row["backend"], tuple(row["capability"])) != (op, backend, tuple(capability)):
            continue
        if backend == "triton" and _major_minor(row.get("triton")) != triton_now:
            continue
        return True
    return False


@functools.lru_cache(maxsize=None)
def build_info_versions() -> dict:
    version = None
    if triton_importable():
        import triton

        version = triton.__version__
    return {"torch": torch.__version__, "triton": version}


def backend_supports(op: str, backend: str, *inputs) -> bool:
    """``itm_kernels.<op>.<backend>.supports(*inputs)`` where that module defines it (shape/dtype limits of a
    kernel); True for backends without limits. Imported lazily: the Triton modules import triton."""
    import importlib

    try:
        module = importlib.import_module(f"itm_kernels.{op}.{backend}")
    except ImportError:
        return False
    fn = getattr(module, "supports", None)
    return True if fn is None or not inputs else bool(fn(*inputs))


def _warn_unverified(op: str, capability: tuple[int, int]) -> None:
    key = (op, capability)
    if key in _WARNED:
        return
    _WARNED.add(key)
    import warnings

    warnings.warn(
        f"itm_kernels: no GPU kernel of {op} is verified on compute capability {capability[0]}.{capability[1]}, so "
        f"backend='auto' runs the chunked 'torch' backend (cuBLAS). To enable the fused kernels here, run "
        f"`python tools/gpu_check.py` on this GPU and add its --record rows to VERIFIED_GPU_KERNELS in "
        f"itm_kernels/_common/dispatch.py; or pass backend='triton' / backend='cuda' explicitly.",
        RuntimeWarning, stacklevel=4)


def choose_backend(requested: str, device: torch.device, op: str = "xattn_sim", inputs: tuple = ()) -> str:
    """Resolve ``backend=`` for ``op`` on ``device``; the ONE rule for every op.

    "auto": the first backend of ``AUTO_ORDER[device.type]`` that is available here, whose kernel exists for
    ``op`` ("cpu": ``has_cpu_op``), that is verified for this GPU's compute capability (GPU kernels only,
    ``VERIFIED_GPU_KERNELS``) and whose ``supports(*inputs)`` accepts the inputs; else "torch". When a GPU kernel
    is skipped only because it is unverified, warns once per (op, capability) how to run the check. The Triton
    interpreter on CPU tensors is for tests, never a default; "reference" is never automatic.
    A named backend must be available for the device (else ValueError listing what is).
    """
    usable = available_backends(device)
    if requested == "auto":
        unverified = False
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if name not in usable:
                continue
            if name == "cpu" and not has_cpu_op(op):
                continue
            if name in GPU_BACKENDS:
                if device.type != "cuda":
                    continue
                if not is_verified(op, name, device_capability(device)):
                    unverified = True
                    continue
            # Only GPU kernels have shape/dtype limits ("cpu" and "torch" take everything validation passes).
            if name in GPU_BACKENDS and not backend_supports(op, name, *inputs):
                continue
            if unverified and name not in GPU_BACKENDS:
                _warn_unverified(op, device_capability(device))
            return name
        if unverified:
            _warn_unverified(op, device_capability(device))
        return "torch"
    if requested not in usable:
        raise ValueError(f"backend {requested!r} is not available for {device.type} tensors in this install; "
                         f"available: {usable} (see itm_kernels.build_info())")
    return requested
