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
* yardstick (the hardware limit): ``fastest_product_timing(a, b)`` times a @ b by torch.mm, oneDNN linear and our
  brgemm (``itm_kernels._common.fast_mm``) in this run and returns a ``Yardstick`` (the winner's ``Timing``, its
  name, every candidate's median); ``bare_product_timing`` is the packed cross-attention product
  (N_img K x d) @ (d x sum L); ``gemm_yardstick(flops, dtype, m, k, n)`` scales an (m x k) @ (k x n) product to
  a FLOP count. ``Yardstick.fraction(ours)`` = bare / ours.
* a script: ``standard_parser`` (``--quick --repeats --warmup --threads --no-memory``), ``start`` / ``finish``
  (header and load-average lines), ``subset_timing`` (an official-style loop timed on a subset, extrapolated by
  pairs), ``speedup_cells`` (vs the float32 reference and vs the reference fed the same dtype), ``peak_memory``
  (the table cell of the fresh-process method), ``print_table`` and ``SPREAD_NOTE`` (the method, under a table).
* ``speedup(base, ours)`` -> ``"3.1x"``; ``mib(nbytes)`` -> ``"19.1"``.
"""
from __future__ import annotations

import argparse
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

    def scaled(self, factor: float) -> "Timing":
        """The same runs with every time multiplied by ``factor`` (extrapolation by pairs, FLOP scaling)."""
        return Timing(tuple(t * factor for t in self.times))


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


def run_measuring_peak(call) -> tuple[object, int]:
    """``(call(), peak bytes)``: freed heap trimmed, VmHWM reset, ``call()`` run once in THIS process; the peak is the
    high-water mark above the RSS just before the call (the result counts while alive). Only honest in a fresh
    process (``peak_memory_subprocess``, or a benchmark's own child process)."""
    trim_heap()
    if not _reset_hwm():
        raise RuntimeError("cannot reset the peak-RSS counter (/proc/self/clear_refs): Linux only")
    base = _status_kib("VmRSS")
    out = call()
    return out, max(0, _status_kib("VmHWM") - base) * 1024


def measure_peak_here(call, warmup: int = 0) -> int:
    """Peak resident memory of ``call()`` above the RSS just before it, in bytes, in THIS process, after ``warmup``
    untimed calls (``run_measuring_peak``). Only honest in a fresh process: use ``peak_memory_subprocess``."""
    for _ in range(warmup):
        call()
    return run_measuring_peak(call)[1]


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


@dataclass(frozen=True)
class Yardstick:
    """The hardware limit of one measurement: the fastest available matrix product of the same FLOPs and dtype.

    ``timing``: the winner's wall times (seconds, already scaled to the FLOPs in question); ``name``: the winner
    ("torch.mm", "oneDNN linear" or "brgemm"); ``medians``: every candidate's median seconds, same scale."""
    timing: Timing
    name: str
    medians: dict

    def scaled(self, factor: float) -> "Yardstick":
        return Yardstick(self.timing.scaled(factor), self.name, {k: v * factor for k, v in self.medians.items()})

    def cell(self, fmt: str = ".3g") -> str:
        """Table cell: ``"1.23 (1.20-1.31) brgemm"``."""
        return f"{self.timing.cell(fmt)} {self.name}"

    def fraction(self, ours: Timing) -> str:
        """Fraction of the hardware limit: bare-product median / our median (1.0 = as fast as the bare product)."""
        return f"{self.timing.median / ours.median:.2f}"

    def note(self) -> str:
        return "bare product candidates (median s): " + ", ".join(f"{k} {v:.3g}" for k, v in self.medians.items())


def _native_bf16() -> bool:
    """Whether this CPU (at the SIMD level in use) has a native bfloat16 dot product (``build_info``)."""
    import itm_kernels
    return bool(itm_kernels.build_info().get("native_bf16", True))


def fastest_product_timing(a, b, *, repeats: int = 3, warmup: int = 1, col_chunk: int = 8192,
                           max_out_bytes: int = 128 << 20) -> Yardstick:
    """Timing of the product ``a @ b`` ((M, K) @ (K, N), the operands' dtype) by the fastest product this CPU has:
    ``torch.mm`` (MKL: AVX2 code on AMD CPUs), oneDNN linear (``torch._C._nn.mkldnn_linear`` on oneDNN-layout
    tensors) and our brgemm (``itm_kernels._common.fast_mm.mm_float_out``), each timed here, after ``warmup``
    runs, over ``repeats`` runs. The product is computed in column blocks of ``col_chunk`` and row blocks whose
    result is at most ``max_out_bytes`` (same FLOPs, bounded memory); operand packing and layout conversion happen
    once, outside the timed region. bfloat16 operands on a CPU without a native bfloat16 dot product (AVX2, or
    ``ITM_KERNELS_ISA=avx2``) get the float32 product of the widened operands (widened outside the timed region)
    instead of ATen's bfloat16 products, which are scalar fallbacks there: the fastest way to that product on such
    a CPU, and the one our kernels take. Returns the winner (lowest median) with every
    candidate's median."""
    m, n = a.shape[0], b.shape[1]
    cols = [(c0, min(n, c0 + col_chunk)) for c0 in range(0, n, col_chunk)]
    rows_per = max(1, max_out_bytes // (4 * min(n, col_chunk)))
    rows = [(r0, min(m, r0 + rows_per)) for r0 in range(0, m, rows_per)]
    b_blocks = [b[:, c0:c1].contiguous() for c0, c1 in cols]
    candidates = {}
    out = torch.empty(min(m, rows_per), min(n, col_chunk), dtype=a.dtype, device=a.device)

    # bfloat16 without a native dot product: ATen's bfloat16 products are scalar fallbacks there (minutes); the
    # widened float32 product stands in for them.
    widen = a.device.type == "cpu" and a.dtype == torch.bfloat16 and not _native_bf16()

    def run_mm():
        for bb in b_blocks:
            for r0, r1 in rows:
                torch.mm(a[r0:r1], bb, out=out[: r1 - r0, : bb.shape[1]])
    if not widen:
        candidates["torch.mm"] = run_mm
    if a.device.type == "cpu" and torch.backends.mkldnn.is_available() and not widen:
        try:
            a_blocks = [a[r0:r1].contiguous().to_mkldnn() for r0, r1 in rows]
            w_blocks = [bb.t().contiguous().to_mkldnn() for bb in b_blocks]
            torch._C._nn.mkldnn_linear(a_blocks[0], w_blocks[0])

            def run_linear():
                for w in w_blocks:
                    for x in a_blocks:
                        torch._C._nn.mkldnn_linear(x, w)
            candidates["oneDNN linear"] = run_linear
        except RuntimeError:                                   # no oneDNN kernel for this dtype here
            pass
    if a.device.type == "cpu" and brgemm_available(a.dtype):
        def run_brgemm():
            for bb in b_blocks:
                for r0, r1 in rows:
                    mm_float_out(a[r0:r1], bb)
        candidates["brgemm"] = run_brgemm
    if widen:
        a32, b32 = a.float(), [bb.float() for bb in b_blocks]
        out32 = out.float()

        def run_widened():
            for bb in b32:
                for r0, r1 in rows:
                    torch.mm(a32[r0:r1], bb, out=out32[: r1 - r0, : bb.shape[1]])
        candidates["fp32 mm (no native bf16)"] = run_widened
    results = {name: timings(fn, repeats=repeats, warmup=warmup) for name, fn in candidates.items()}
    name = min(results, key=lambda k: results[k].median)
    return Yardstick(results[name], name, {k: t.median for k, t in results.items()})


def bare_product_timing(images, captions, lens, repeats=3, chunk_words=8192) -> Yardstick:
    """Yardstick of the irreducible product of cross attention: packed (N_img K x d) @ (d x sum L) in the inputs'
    dtype (``fastest_product_timing``: the fastest of torch.mm, oneDNN linear and brgemm, timed in this run)."""
    a = images.reshape(-1, images.shape[-1])
    mask = torch.arange(captions.shape[1], device=lens.device)[None, :] < lens[:, None]
    bt = captions[mask].t()                                   # (d, sum L)
    return fastest_product_timing(a, bt, repeats=repeats, col_chunk=chunk_words)


def bare_product_time(images, captions, lens, repeats=3, chunk_words=8192) -> float:
    """Median seconds of ``bare_product_timing``."""
    return bare_product_timing(images, captions, lens, repeats, chunk_words).timing.median


def gemm_yardstick(flops: float, dtype: torch.dtype, m: int = 8192, k: int = 1024, n: int = 256,
                   repeats: int = 3, device="cpu") -> Yardstick:
    """Yardstick of ``flops`` FLOPs of matrix products in ``dtype``: the fastest product of (m x k) @ (k x n)
    (``fastest_product_timing``), timed here and scaled by ``flops / (2 m k n)``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(k, n, generator=g).to(device, dtype)
    return fastest_product_timing(a, b, repeats=repeats).scaled(flops / (2.0 * m * k * n))


def bare_gemm_rate(dtype: torch.dtype, device="cpu", m: int = 8192, k: int = 1024, n: int = 256) -> float:
    """FLOP/s (median) of the fastest product (``gemm_yardstick``) on (m x k) @ (k x n) in ``dtype``."""
    return 1.0 / gemm_yardstick(1.0, dtype, m, k, n, device=device).timing.median


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


def matched_features(n_img, n_cap, K=36, d=1024, min_len=8, max_len=20, dtype=torch.float32, seed=0, device="cpu",
                     signal: float = 0.3, noise: float = 0.95):
    """Embeddings with a ground truth: caption c describes image c * n_img // n_cap (each real word is
    l2norm(signal * one of its image's regions + noise * unit noise), as in the official goldens' generator), so
    recall is meaningful. Unit-norm rows: images (n_img, K, d), captions (n_cap, max_len, d) in ``dtype``, lengths
    (n_cap,) int64 uniform in min_len..max_len. The default signal makes every metric 100 at once; the SGRAF rows of
    bench_eval use a weak one (0.1, noise 1)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g), dim=-1)
    lens = torch.randint(min_len, max_len + 1, (n_cap,), generator=g)
    owner = torch.arange(n_cap) * n_img // n_cap
    regions = torch.randint(0, K, (n_cap, max_len), generator=g)
    unit_noise = torch.nn.functional.normalize(torch.randn(n_cap, max_len, d, generator=g), dim=-1)
    captions = torch.nn.functional.normalize(signal * images[owner[:, None], regions] + noise * unit_noise, dim=-1)
    return images.to(device, dtype), captions.to(device, dtype), lens.to(device)


# ------------------------------------------------------------------------------------------------------------------
# What every bench_*.py shares: options, header/footer lines, the official-style subset timing, ratio cells, memory
# ------------------------------------------------------------------------------------------------------------------

SCAN_LAMBDAS = {"t2i": (9.0, 6.0), "i2t": (4.0, 5.0)}     # (lambda_softmax, lambda_lse) of SCAN's official runs
DTYPES = "float32,bfloat16"


def standard_parser(doc: str, *, repeats: int = 3, threads: int = 0) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes: ``--quick`` (the smoke size: about a minute),
    ``--repeats`` (timed runs; medians with the min-max spread), ``--warmup`` (untimed runs first), ``--threads``
    (torch threads; 0 = torch's own) and ``--no-memory`` (skip the fresh-process peak-memory measurements)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-run sizes (about a minute)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs (median, min-max)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--threads", type=int, default=threads, help="torch threads (0: torch's own, all cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column (fresh processes)")
    return parser


def parse_size(text: str) -> tuple[int, int]:
    """``"200x1000"`` -> (200, 1000)."""
    try:
        a, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"a size is N_IMGxN_CAP such as 200x1000, got {text!r}") from None
    return a, b


def start(name: str, args) -> None:
    """Apply ``args.threads``; print the header line (script, machine, versions, threads, load average)."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    print(f"# {name} | {machine_line()} | load average {os.getloadavg()[0]:.2f} at start", flush=True)


def finish(notes=()) -> None:
    """Print the method line (``SPREAD_NOTE``), the ``notes`` (e.g. every yardstick candidate's time) and the
    load average at the end."""
    print(f"# {SPREAD_NOTE}")
    for note in notes:
        print(note)
    print(f"# load average {os.getloadavg()[0]:.2f} at end", flush=True)


def subset_timing(fn, n_pairs: int, sub_pairs: int, *, repeats: int = 3, warmup: int = 1) -> Timing:
    """Timing of ``fn()`` (a run over ``sub_pairs`` pairs) extrapolated linearly by pairs to ``n_pairs``."""
    return timings(fn, repeats=repeats, warmup=warmup).scaled(n_pairs / sub_pairs)


def speedup_cells(ref32: Timing, ref_same: Timing | None, ours: Timing) -> list[str]:
    """[speed-up vs the float32 reference, speed-up vs the reference fed the same dtype ("-" if that IS float32)],
    from medians."""
    return [speedup(ref32.median, ours.median), "-" if ref_same is None else speedup(ref_same.median, ours.median)]


COMPARISON_HEADERS = ["official-style fp32 s", "official-style same dtype s", "ours s", "speed-up vs fp32 loop",
                      "speed-up vs same-dtype loop"]


def comparison_cells(ref32: Timing, ref_same: Timing | None, ours: Timing, mark: str = "~") -> list[str]:
    """The cells under ``COMPARISON_HEADERS``: the official-style loop fed float32 and fed the row's dtype (``None``
    for float32 rows: "-"), ``mark`` ("~") where they were extrapolated, ours, and the two speed-ups."""
    return [f"{mark}{ref32.cell('.3g')}", "-" if ref_same is None else f"{mark}{ref_same.cell('.3g')}",
            ours.cell(".3g"), *speedup_cells(ref32, ref_same, ours)]


def peak_memory(builder, *args, device: str = "cpu", enabled: bool = True, **kwargs) -> str:
    """Table cell: peak extra MiB of one call made by ``builder(*args, **kwargs)`` (a module-level function that
    builds the inputs and returns the call): on the CPU in a fresh process (``peak_memory_subprocess``, output
    included), on CUDA the allocator peak in this process. ``"-"`` when ``enabled`` is False."""
    if not enabled:
        return "-"
    if device == "cuda":
        return mib(peak_extra_memory(builder(*args, **kwargs))[1])
    return mib(peak_memory_subprocess(builder, *args, warmup=1, **kwargs))


SPREAD_NOTE = ("times: median (min-max) of the repeats after warm-up; speed-ups and fractions from medians; "
               "fraction of GEMM limit = bare product time / ours (1.0 = as fast as the fastest bare matrix product "
               "of the same FLOPs and dtype, timed in this run, winner named); peak extra MiB = resident high-water "
               "mark rise of one call in a fresh process (the output counts)")


OP_HEADERS = ["size", "dtype", "threads", "torch path fp32 s", "torch path same dtype s", "ours s",
              "speed-up vs fp32 torch", "speed-up vs same-dtype torch", "ours GFLOP/s", "bare GEMM s (winner)",
              "fraction of GEMM limit", "peak extra MiB"]


def op_rows(builder, n_img: int, n_cap: int, args, flops: float, yardstick, notes: list) -> list[list]:
    """Rows (``OP_HEADERS``) of an op benchmark whose reference is the op's torch path and ours its C++ kernel:
    per dtype of ``args.dtypes``, ``builder(n_img, n_cap, dtype_name, path)`` (path "torch" | "cpu", a module-level
    function returning the call) is timed for both paths; the float32 torch path is the first reference, the
    torch path fed the row's dtype the second; ``yardstick(dtype)`` is the row's ``Yardstick`` (same FLOPs);
    memory: one call of ours in a fresh process."""
    rows, ref32 = [], None
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        ref = timings(builder(n_img, n_cap, name, "torch"), repeats=args.repeats, warmup=args.warmup)
        ours = timings(builder(n_img, n_cap, name, "cpu"), repeats=args.repeats, warmup=args.warmup)
        if dtype == torch.float32:
            ref32 = ref
        elif ref32 is None:
            ref32 = timings(builder(n_img, n_cap, "float32", "torch"), repeats=args.repeats, warmup=args.warmup)
        bare = yardstick(dtype)
        notes.append(f"# {name}: {bare.note()}")
        same = None if dtype == torch.float32 else ref
        mem = peak_memory(builder, n_img, n_cap, name, "cpu", enabled=not args.no_memory)
        rows.append([f"{n_img}x{n_cap}", name, torch.get_num_threads(), ref32.cell(".3g"),
                     "-" if same is None else ref.cell(".3g"), ours.cell(".3g"), *speedup_cells(ref32, same, ours),
                     f"{flops / ours.median / 1e9:.0f}", bare.cell(".3g"), bare.fraction(ours), mem])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    return rows
