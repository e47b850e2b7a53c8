"""The CPU benchmarks at each SIMD level, side by side: how close each op stays to the bare GEMM on AVX2 and on
AVX-512 (and baseline), measured in one run of this script on one machine.

    python benchmarks/bench_isa.py --quick                               # small sizes: a few minutes
    python benchmarks/bench_isa.py                                       # the issue-15 sizes (an hour on 2 cores)
    python benchmarks/bench_isa.py --benches xattn_d256 --levels native,avx2,baseline

Each benchmark script (``bench_xattn_sim``, ``bench_local_sim``, ``bench_sgraf``, ``bench_gsmn``) runs once per
level in a fresh process with ``ITM_KERNELS_ISA`` set (``native`` leaves it unset: the CPU's own level). That
variable caps our epilogues AND oneDNN's brgemm (``ONEDNN_MAX_CPU_ISA=AVX2``), so a forced ``avx2`` run is what an
AVX2-only CPU runs, except that ATen's own ``torch.mm`` (MKL, part of the bare-GEMM yardstick) keeps its own
dispatch. Each process times its bare GEMM of the same FLOPs itself (the yardstick of the child script), so each
fraction is measured side by side with the op it judges. Levels alternate per benchmark (native, avx2, ...), so
slow drifts of a shared machine hit every level alike.

Prints each child's table, then one summary: per benchmark row and level, ours (median s), the bare GEMM (median s)
and the fraction of the GEMM limit (bare / ours; 1.0 = as fast as the bare product), and the ratio of each
level's time to the first level's.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_line, print_table  # noqa: E402

# name: (script, arguments, key columns of its table)
BENCHES = {
    "xattn_d1024": ("bench_xattn_sim.py", ["--sizes", "200x1000,1000x5000", "--dtypes", "float32",
                                           "--official-pairs", "200"], ["size", "dir", "dtype"]),
    "xattn_d256": ("bench_xattn_sim.py", ["--sizes", "200x1000,1000x5000", "--dim", "256", "--dtypes", "float32",
                                          "--official-pairs", "200"], ["size", "dir", "dtype"]),
    "local_sim": ("bench_local_sim.py", ["--size", "60x300"], ["size", "dtype"]),
    "sgraf": ("bench_sgraf.py", ["--size", "50x250", "--official-captions", "10"], ["size", "head", "dtype"]),
    "gsmn": ("bench_gsmn.py", ["--size", "50x250", "--official-subset", "10", "25"], ["size", "head", "inputs"]),
}
QUICK = {
    "xattn_d1024": ["--sizes", "100x500", "--dtypes", "float32", "--official-pairs", "100"],
    "xattn_d256": ["--sizes", "200x1000", "--dim", "256", "--dtypes", "float32", "--official-pairs", "100"],
    "local_sim": ["--size", "20x100"],
    "sgraf": ["--size", "20x100", "--official-captions", "5"],
    "gsmn": ["--size", "20x100", "--official-subset", "5", "10"],
}


def last_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the last markdown table in ``text``."""
    blocks, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    if not blocks:
        raise RuntimeError("no table in the benchmark's output")
    table = blocks[-1]
    return table[0], [r for r in table[2:] if len(r) == len(table[0])]


def median_of(cell: str) -> float:
    """The median of a "median (min-max)" cell (a leading "~" allowed)."""
    return float(cell.lstrip("~").split()[0])


def run_level(script: str, args: list[str], level: str, common: list[str]) -> str:
    env = dict(os.environ)
    env.pop("ITM_KERNELS_ISA", None)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if level != "native":
        env["ITM_KERNELS_ISA"] = level
    cmd = [sys.executable, str(HERE / script), *args, *common]
    print(f"# {level}: {' '.join(cmd[1:])}", flush=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(out.stdout, flush=True)
    if out.returncode != 0:
        raise RuntimeError(f"{script} at {level} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--benches", default="xattn_d1024,xattn_d256,local_sim,sgraf,gsmn",
                   help=f"comma-separated, of {', '.join(BENCHES)}")
    p.add_argument("--levels", default="native,avx2", help="comma-separated: native, avx512, avx2, baseline")
    p.add_argument("--xattn-sizes", default=None, help="N_imgxN_cap list for the xattn rows (default 200x1000,1000x5000)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    levels = args.levels.split(",")
    for lv in levels:
        if lv not in ("native", "avx512", "avx2", "baseline"):
            p.error(f"--levels: unknown level {lv!r} (expected native, avx512, avx2 or baseline)")
    names = args.benches.split(",")
    for n in names:
        if n not in BENCHES:
            p.error(f"--benches: unknown benchmark {n!r} (expected one of {', '.join(BENCHES)})")
    common = ["--repeats", str(args.repeats), "--no-memory", "--threads", str(args.threads)]
    print(f"# {machine_line()}", flush=True)
    summary = []
    for name in names:
        script, bench_args, keys = BENCHES[name]
        if args.quick:
            bench_args = QUICK[name]
        if args.xattn_sizes and name.startswith("xattn"):
            bench_args = list(bench_args)
            bench_args[bench_args.index("--sizes") + 1] = args.xattn_sizes
        per_level = {}
        for lv in levels:
            headers, rows = last_table(run_level(script, bench_args, lv, common))
            ki = [headers.index(k) for k in keys]
            oi = headers.index("ours s")
            bi = next(i for i, h in enumerate(headers) if h.startswith("bare GEMM"))
            fi = headers.index("fraction of GEMM limit")
            per_level[lv] = {tuple(r[i] for i in ki): (median_of(r[oi]), median_of(r[bi]), r[fi]) for r in rows}
        for key in per_level[levels[0]]:
            cells = [name, " ".join(key)]
            base = per_level[levels[0]][key][0]
            for lv in levels:
                ours, bare, frac = per_level[lv].get(key, (float("nan"), float("nan"), "-"))
                cells += [f"{ours:.3g}", f"{bare:.3g}", frac, f"{ours / base:.2f}"]
            summary.append(cells)
    headers = ["bench", "row"]
    for lv in levels:
        headers += [f"{lv} ours s", f"{lv} bare GEMM s", f"{lv} fraction", f"{lv} time / {levels[0]}"]
    print_table(f"SIMD levels side by side ({args.repeats} repeats each, medians; fraction = bare GEMM / ours in the "
                "same process)", headers, summary)
    print(f"# load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
