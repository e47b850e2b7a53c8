"""Shared benchmark helpers: timing (median of repeats after warm-up), peak memory, inputs, table printing."""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from datetime import date

import torch

from itm_kernels._common.fast_mm import brgemm_available, mm_float_out


def median_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs (CUDA-synchronised)."""
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
    return statistics.median(times)


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


def random_features(n_img, n_cap, K=36, d=1024, min_len=8, max_len=20, dtype=torch.float32, seed=0, device="cpu"):
    """Unit-norm random (images (n_img, K, d), captions (n_cap, max_len, d), lengths uniform min_len..max_len)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(n_cap, max_len, d, generator=g), dim=-1)
    lens = torch.randint(min_len, max_len + 1, (n_cap,), generator=g)
    return images.to(device, dtype), captions.to(device, dtype), lens.to(device)


def bare_product_time(images, captions, lens, repeats=3, chunk_words=8192) -> float:
    """Time of the irreducible product: packed (N_img K x d) @ (d x sum L) in the inputs' dtype, chunked over words
    into a reused output buffer (same FLOPs, bounded memory), by the faster of torch.mm and oneDNN brgemm
    (``itm_kernels._common.fast_mm``: 2x MKL's float32 rate on AMD CPUs, where torch.mm runs MKL's AVX2 code)."""
    a = images.reshape(-1, images.shape[-1])
    mask = torch.arange(captions.shape[1], device=lens.device)[None, :] < lens[:, None]
    words = captions[mask]                                    # (sum L, d)
    bt = words.t().contiguous()
    out = torch.empty(a.shape[0], min(chunk_words, words.shape[0]), dtype=a.dtype, device=a.device)

    def run():
        for w0 in range(0, bt.shape[1], chunk_words):
            b = bt[:, w0:w0 + chunk_words]
            torch.mm(a, b, out=out[:, : b.shape[1]])
    best = median_time(run, repeats=repeats)
    if brgemm_available(a.dtype) and a.device.type == "cpu":
        del out
        blocks = [bt[:, w0:w0 + chunk_words].contiguous() for w0 in range(0, bt.shape[1], chunk_words)]
        rows = max(1, (128 << 20) // (4 * chunk_words))       # float32 results of at most 128 MiB at a time

        def run_brgemm():
            for b in blocks:
                for r0 in range(0, a.shape[0], rows):
                    mm_float_out(a[r0:r0 + rows], b)
        best = min(best, median_time(run_brgemm, repeats=repeats))
    return best


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
