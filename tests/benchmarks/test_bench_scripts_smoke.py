"""Every benchmark script runs end to end at its tiniest size and prints the standard table: the reference time(s),
ours, the speed-ups, the fastest bare product (winner named) and its fraction, the peak-memory column, and
spreads. The scripts are run as users run them (a subprocess, ``python benchmarks/bench_x.py``), so they cannot
rot unnoticed. The cheap ones run by default (a few seconds each on an idle 2-core machine, without the
fresh-process memory column, whose method ``test_bench_memory.py`` checks); the model-sized ones and the memory
columns of the scripts are marked slow."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--threads", "1", "--repeats", "2", "--warmup", "0"]
SPREAD = re.compile(r"\d\S* \(\d\S*-\d\S*\)")                       # "1.23 (1.20-1.31)"
WINNER = re.compile(r"\) (torch\.mm|oneDNN linear|brgemm) \|")


def run_script(name: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def table_rows(out: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and data rows of the first Markdown table whose first header cell is ``first_header``."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return cells, rows
    raise AssertionError(f"no table starting with {first_header!r} in:\n{out[-3000:]}")


def check_standard_table(out: str, first_header: str, n_rows: int, memory: bool = True) -> list[dict]:
    headers, rows = table_rows(out, first_header)
    for col in ("ours s", "fraction of GEMM limit", "peak extra MiB"):
        assert any(col in h for h in headers), (col, headers)
    memory_cols = [h for h in headers if "peak extra MiB" in h]
    assert sum(h.startswith("speed-up vs") for h in headers) == 2, headers     # vs fp32 and vs the same dtype
    assert len(rows) == n_rows, rows
    named = [dict(zip(headers, r)) for r in rows]
    for row in named:
        assert SPREAD.search(row["ours s"]), row
        assert float(row["fraction of GEMM limit"]) >= 0, row            # "0.00" at tiny sizes on a loaded machine
        if memory and "ensemble" not in row.values():                 # ensemble rows add two runs: no memory
            assert all(float(row[h]) >= 0 for h in memory_cols), row
    assert WINNER.search(out), "the bare-product winner is not named"
    bf16 = [r for r in named if "bfloat16" in r.values()]
    assert all(r[h] != "-" for r in bf16 for h in r if h.startswith("speed-up vs")), bf16
    return named


def test_bench_local_sim_smoke():
    out = run_script("bench_local_sim.py", "--size", "2x6", "--no-memory", *TINY)
    rows = check_standard_table(out, "size", 2, memory=False)
    assert rows[0]["speed-up vs same-dtype torch"] == "-"            # float32 row: the two baselines are one


def test_bench_node_match_smoke():
    out = run_script("bench_node_match.py", "--size", "2x6", "--no-memory", *TINY)
    check_standard_table(out, "size", 2, memory=False)


@pytest.mark.slow
def test_bench_node_match_memory_column():
    out = run_script("bench_node_match.py", "--size", "2x6", *TINY)
    rows = check_standard_table(out, "size", 2)
    assert all(float(r["peak extra MiB"]) > 0 for r in rows), rows      # the outputs are allocated by the call


def test_bench_xattn_sim_smoke():
    out = run_script("bench_xattn_sim.py", "--sizes", "2x6", "--directions", "t2i", "--official-pairs", "12",
                     "--no-memory", *TINY)
    rows = check_standard_table(out, "size", 2, memory=False)
    assert rows[0]["official-style fp32 s"] == rows[1]["official-style fp32 s"]   # the same fp32 loop timing


@pytest.mark.slow
def test_bench_train_smoke():
    out = run_script("bench_train.py", "--batch", "3", "--directions", "t2i", *TINY)
    rows = check_standard_table(out, "batch", 2)
    assert all(float(r["ours peak extra MiB"]) > 0 for r in rows), rows    # never the in-process "0 MiB"


@pytest.mark.slow
def test_bench_sgraf_smoke():
    out = run_script("bench_sgraf.py", "--size", "2x6", "--modules", "SAF", "--official-captions", "3", *TINY)
    check_standard_table(out, "size", 2)


@pytest.mark.slow
def test_bench_gsmn_smoke():
    out = run_script("bench_gsmn.py", "--size", "2x6", "--official-subset", "2", "3", *TINY)
    check_standard_table(out, "size", 6)


@pytest.mark.slow
def test_bench_eval_smoke(tmp_path):
    out = run_script("bench_eval.py", "--n-img", "20", "--models", "scan,saf", "--directions", "t2i",
                     "--train-steps", "1", "--official-pairs", "100", "--plot", str(tmp_path / "p.png"), *TINY)
    check_standard_table(out, "gallery", 2)
    headers, rows = table_rows(out, "gallery")
    assert rows[0][1] == "t2i"


@pytest.mark.slow
def test_bench_scale_smoke():
    out = run_script("bench_scale.py", "--quick", "--table", "scale")
    headers, rows = table_rows(out, "gallery")
    assert len(rows) == 2 and any(h.startswith("peak extra MiB") for h in headers)
