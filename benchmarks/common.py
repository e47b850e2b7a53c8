"""Shared benchmark helpers: timing with spread, allocator-level peak memory in a fresh process, inputs, tables.

How to use them in a new ``bench_*.py`` (run as ``python benchmarks/bench_x.py``, which puts benchmarks/ on
sys.path so that ``from common import ...`` works):

* time: ``t = timings(fn, repeats=3, warmup=1)`` -> ``Timing`` (``.median``, ``.min``, ``.max``, seconds);
  ``str(t)`` / ``t.cell()`` is the table cell ``"1.23 (1.20-1.31)"`` = median (min-max of the repeats). Every
  table states the spread this way. ``median_time`` is kept for callers that want the bare median.
* memory: ``peak_memory_subprocess(builder, *args, **kwargs)`` -> bytes. ``builder`` is a MODULE-LEVEL function
  (picklable: defined in an importable module or in your script under ``if __name__ == "__main__"`` protection)
  that builds the inputs and returns a zero-argument callable. It runs in a fresh "spawn" process: inputs are
  built, freed heap is returned to the OS, the kernel's resident high-water mark is reset
  (``echo 5 > /proc/self/clear_refs``), the callable runs ONCE, and the result is VmHWM minus the RSS just
  before the call. The call's result (e.g. the (N_img, N_cap) output) is alive at the end and so is counted;
  memory allocated and freed inside the call is counted too (the high-water mark cannot be hidden by reuse,
  since nothing was resident to be reused). Resolution: pages (4 KiB); one-off library initialisation inside the
  call (oneDNN kernel generation, thread pools) is counted as well, typically < 1 MiB.
  On CUDA ``peak_extra_memory`` (allocator peak) is exact in-process; on the CPU it is NOT trustworthy (freed
  pages of earlier runs stay resident and hide the peak) and is kept only for old callers.
* yardstick: ``bare_product_time`` / ``bare_gemm_rate`` take the faster of torch.mm and oneDNN brgemm measured
  in the same run; ``*_timing`` variants return the full ``Timing`` of the winner and its name.
* ``speedup(base, ours)`` -> ``"3.1x"``; ``mib(nbytes)`` -> ``"19.1"``.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import date

import torch

from itm_kernels._common.fast_mm import brgemm_available, mm_float_out


def median_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (``timings(fn, repeats, warmup).median``)."""
    return timings(fn, repeats, warmup).median


@dataclass(frozen=True)
class Timing:
    """Wall times of the repeats of one measurement (seconds)."""
    times: tuple

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    def cell(self, fmt: str = ".3g") -> str:
        """Table cell: median (min-max of the repeats)."""
        return f"{self.median:{fmt}} ({self.min:{fmt}}-{self.max:{fmt}})"

    __str__ = cell


def timings(fn, repeats: int = 3, warmup: int = 1) -> Timing:
    """Wall times of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA-synchronised)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


def speedup(base_seconds: float, our_seconds: float) -> str:
    """``"3.1x"``: how many times faster ``our_seconds`` is than ``base_seconds``."""
    return f"{base_seconds / our_seconds:.1f}x"


def mib(nbytes: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{nbytes / 2**20:.1f}"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_extra_memory(fn) -> tuple[object, int]:
    """Run ``fn()``; return its result and the extra peak memory in bytes (CUDA peak allocation on a GPU; on
    the CPU the rise of the process's resident high-water mark, reset first through /proc/self/clear_refs)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _status_kib("VmRSS")
    out = fn()
    return out, max(0, _status_kib("VmHWM") - base) * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak_here(call, warmup: int = 0) -> int:
    """Peak resident memory of ``call()`` above the RSS just before it, in bytes, in THIS process (reset VmHWM,
    run once, read VmHWM). Only honest in a fresh process: use ``peak_memory_subprocess``."""
    for _ in range(warmup):
        call()
    trim_heap()
    if not _reset_hwm():
        raise RuntimeError("cannot reset the peak-RSS counter (/proc/self/clear_refs): Linux only")
    base = _status_kib("VmRSS")
    out = call()                                            # noqa: F841  (kept alive: the output counts)
    peak = _status_kib("VmHWM")
    return max(0, peak - base) * 1024


def _child(builder, args, kwargs, threads, warmup, queue):
    try:
        torch.set_num_threads(threads)
        call = builder(*args, **kwargs)
        queue.put(("ok", measure_peak_here(call, warmup)))
    except BaseException as exc:                           # report, do not hang the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def peak_memory_subprocess(builder, *args, warmup: int = 0, threads: int | None = None, **kwargs) -> int:
    """Peak extra memory (bytes) of one call, measured in a fresh spawned process (see the module docstring).

    ``builder(*args, **kwargs)`` runs in the child, builds the inputs and returns the zero-argument callable to
    measure; ``warmup`` extra calls run before the measured one (their freed memory is trimmed, default 0).
    ``threads`` defaults to the parent's ``torch.get_num_threads()``. On a GPU, use ``peak_extra_memory``."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(builder, args, kwargs, threads or torch.get_num_threads(), warmup,
                                            queue))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"memory measurement of {getattr(builder, '__name__', builder)} failed: {value}")
    return value


def random_features(n_img, n_cap, K=36, d=1024, min_len=8, max_len=20, dtype=torch.float32, seed=0, device="cpu"):
    """Unit-norm random (images (n_img, K, d), captions (n_cap, max_len, d), lengths uniform min_len..max_len)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(n_cap, max_len, d, generator=g), dim=-1)
    lens = torch.randint(min_len, max_len + 1, (n_cap,), generator=g)
    return images.to(device, dtype), captions.to(device, dtype), lens.to(device)


def bare_product_timing(images, captions, lens, repeats=3, chunk_words=8192) -> tuple[Timing, str]:
    """Timing of the irreducible product: packed (N_img K x d) @ (d x sum L) in the inputs' dtype, chunked over
    words into a reused output buffer (same FLOPs, bounded memory), by the faster (lower median) of torch.mm and
    oneDNN brgemm (``itm_kernels._common.fast_mm``: 2x MKL's float32 rate on AMD CPUs, where torch.mm runs MKL's
    AVX2 code), both timed in this run. Returns (Timing of the winner, "torch.mm" or "brgemm")."""
    a = images.reshape(-1, images.shape[-1])
    mask = torch.arange(captions.shape[1], device=lens.device)[None, :] < lens[:, None]
    words = captions[mask]                                    # (sum L, d)
    bt = words.t().contiguous()
    out = torch.empty(a.shape[0], min(chunk_words, words.shape[0]), dtype=a.dtype, device=a.device)

    def run():
        for w0 in range(0, bt.shape[1], chunk_words):
            b = bt[:, w0:w0 + chunk_words]
            torch.mm(a, b, out=out[:, : b.shape[1]])
    best, name = timings(run, repeats=repeats), "torch.mm"
    if brgemm_available(a.dtype) and a.device.type == "cpu":
        del out
        blocks = [bt[:, w0:w0 + chunk_words].contiguous() for w0 in range(0, bt.shape[1], chunk_words)]
        rows = max(1, (128 << 20) // (4 * chunk_words))       # float32 results of at most 128 MiB at a time

        def run_brgemm():
            for b in blocks:
                for r0 in range(0, a.shape[0], rows):
                    mm_float_out(a[r0:r0 + rows], b)
        other = timings(run_brgemm, repeats=repeats)
        if other.median < best.median:
            best, name = other, "brgemm"
    return best, name


def bare_product_time(images, captions, lens, repeats=3, chunk_words=8192) -> float:
    """Median seconds of ``bare_product_timing`` (the faster of torch.mm and brgemm)."""
    return bare_product_timing(images, captions, lens, repeats, chunk_words)[0].median


def bare_gemm_rate(dtype: torch.dtype, device="cpu", m: int = 8192, k: int = 1024, n: int = 256) -> float:
    """FLOP/s of the faster of torch.mm and brgemm (``itm_kernels._common.fast_mm``) on (m x k) @ (k x n) in ``dtype``
    (median of 3 runs of 8 products each, after a warm-up)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    out = torch.empty(m, n, dtype=dtype, device=device)
    seconds = median_time(lambda: [torch.mm(a, b, out=out) for _ in range(8)], repeats=3, warmup=1)
    if torch.device(device).type == "cpu" and brgemm_available(dtype):
        seconds = min(seconds, median_time(lambda: [mm_float_out(a, b) for _ in range(8)], repeats=3, warmup=1))
    return 8 * 2 * m * k * n / seconds


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim), so that the next VmHWM rise counts this run's own
    memory rather than hiding in pages a previous run left resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def machine_line() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return (f"{date.today().isoformat()} | {dev} | {os.cpu_count()} cpus, torch {torch.get_num_threads()} threads | "
            f"torch {torch.__version__}")


def print_table(title: str, headers: list[str], rows: list[list]) -> str:
    """Print and return a Markdown table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [f"\n{title}", fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in cells[1:]]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def matched_features(n_img, n_cap, K=36, d=1024, min_len=8, max_len=20, dtype=torch.float32, seed=0, device="cpu"):
    """Embeddings with a ground truth: caption c describes image c // 5 (each real word is a noisy copy of one of
    its image's regions, as in the official goldens' generator), so recall is meaningful. Unit-norm rows."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g), dim=-1)
    lens = torch.randint(min_len, max_len + 1, (n_cap,), generator=g)
    owner = torch.arange(n_cap) * n_img // n_cap
    regions = torch.randint(0, K, (n_cap, max_len), generator=g)
    noise = torch.nn.functional.normalize(torch.randn(n_cap, max_len, d, generator=g), dim=-1)
    captions = torch.nn.functional.normalize(0.3 * images[owner[:, None], regions] + 0.95 * noise, dim=-1)
    return images.to(device, dtype), captions.to(device, dtype), lens.to(device)
