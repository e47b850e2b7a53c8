"""bfloat16 matrix products on CPUs without a native bfloat16 dot product: widened to float32, never ATen's bf16 GEMM.

ATen multiplies CPU bfloat16 matrices with oneDNN's AVX512-BF16 / AMX kernels where the CPU has them, and with a
scalar loop elsewhere (AVX2-only CPUs: 40-60x slower than float32). :func:`widen_bf16_matmuls` is a torch function
mode that, on such a CPU, runs every bfloat16 CPU matrix product of the code under it (``torch.mm``, ``addmm``,
``bmm``, ``baddbmm``, ``matmul``/``@``, ``mv``, ``addmv``, ``einsum``, ``F.linear``, ``F.bilinear``, the GRU/LSTM
cells) on the float32 values of its operands (exact: every bfloat16 is a float32) and rounds the result back to
bfloat16: the same float32 accumulation and bfloat16 result as ATen's bfloat16 GEMM, at the float32 GEMM's speed.
Autograd records the float32 products, so the backward products are float32 as well. The models' forward and
evaluation entry points (SCAN, SGRAF, GSMN, the encoders through them, the losses) run under it.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch.overrides import TorchFunctionMode

from .dispatch import load_extension


def native_bf16() -> bool:
    """Whether CPU bfloat16 matrix products run natively here: AVX512-BF16 (or AMX) at the SIMD level in use
    (``itm_kernels.build_info()["native_bf16"]``; ``ITM_KERNELS_ISA=avx2`` forces False). Without the compiled
    extension: torch's own CPU capability report (``torch.backends.cpu.get_cpu_capability()``)."""
    ext = load_extension()
    if ext is not None:
        return bool(ext.build_info().get("native_bf16", False))
    return _torch_has_native_bf16()


@functools.lru_cache(maxsize=None)
def _torch_has_native_bf16() -> bool:
    try:
        return "AVX512" in torch.backends.cpu.get_cpu_capability() and torch.backends.mkldnn.is_available() and \
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except Exception:
        return False


_F = torch.nn.functional
_WIDENED = {torch.mm, torch.addmm, torch.bmm, torch.baddbmm, torch.matmul, torch.mv, torch.addmv, torch.einsum,
            torch.Tensor.mm, torch.Tensor.addmm, torch.Tensor.bmm, torch.Tensor.baddbmm, torch.Tensor.matmul,
            torch.Tensor.mv, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.addmm_,
            torch.Tensor.baddbmm_, _F.linear, _F.bilinear, torch.gru, torch.lstm, torch.gru_cell, torch.lstm_cell,
            torch.rnn_tanh, torch.rnn_relu, torch.bilinear, torch.nn.functional.scaled_dot_product_attention}


def _is_cpu_bf16(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 and x.device.type == "cpu"


def _widen(x):
    if _is_cpu_bf16(x):
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_widen(v) for v in x)
    return x


def _narrow(x):
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
        return x.to(torch.bfloat16)
    if isinstance(x, (list, tuple)):
        return type(x)(_narrow(v) for v in x)
    return x


def _has_cpu_bf16(args) -> bool:
    for a in args:
        if _is_cpu_bf16(a):
            return True
        if isinstance(a, (list, tuple)) and any(_is_cpu_bf16(v) for v in a):
            return True
    return False


_ACTIVE = threading.local()


class _WidenBf16Matmuls(TorchFunctionMode):
    def __enter__(self):
        _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.depth -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WIDENED and _has_cpu_bf16(list(args) + list(kwargs.values())):
            if func in (torch.Tensor.addmm_, torch.Tensor.baddbmm_):  # in place into a bfloat16 tensor
                out = args[0]
                res = func.__name__.rstrip("_")
                wide = getattr(torch, res)(*_widen(args), **{k: _widen(v) for k, v in kwargs.items()})
                return out.copy_(wide)
            return _narrow(func(*_widen(args), **{k: _widen(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def widen_bf16_matmuls(enabled: bool | None = None):
    """Context manager: bfloat16 CPU matrix products under it run as float32 products (results rounded back to
    bfloat16), where ``enabled`` (default: this CPU has no native bfloat16 dot product, :func:`native_bf16`).
    A no-op context otherwise, and for non-CPU or non-bfloat16 tensors."""
    if getattr(_ACTIVE, "depth", 0) > 0:  # already under the mode (nested model calls): nothing more to do
        return contextlib.nullcontext()
    if enabled is None:
        enabled = not native_bf16()
    return _WidenBf16Matmuls() if enabled else contextlib.nullcontext()


def _involves_bf16(args, kwargs) -> bool:
    """A bfloat16 tensor, a module with bfloat16 parameters, or ``torch.bfloat16`` itself among the arguments."""
    for a in list(args) + list(kwargs.values()):
        if a is torch.bfloat16 or (isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16):
            return True
        if isinstance(a, (list, tuple)) and any(isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 for v in a):
            return True
        if isinstance(a, torch.nn.Module) and any(p.dtype == torch.bfloat16 for p in a.parameters()):
            return True
    return False


def widens_bf16_matmuls(fn):
    """Decorator: run ``fn`` under :func:`widen_bf16_matmuls` when bfloat16 is involved (a bfloat16 tensor or
    ``dtype=torch.bfloat16`` argument, or a module ``self`` with bfloat16 parameters) and this CPU has no native
    bfloat16 dot product; float32/float64 calls never pay the mode's per-op Python dispatch."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_ACTIVE, "depth", 0) > 0 or not _involves_bf16(args, kwargs) or native_bf16():
            return fn(*args, **kwargs)
        with _WidenBf16Matmuls():
            return fn(*args, **kwargs)
    return wrapper
