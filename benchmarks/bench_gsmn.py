"""All-pairs GSMN evaluation (dense, sparse, dense + sparse ensemble): ours against the official-style loop.

    python benchmarks/bench_gsmn.py --quick          # 20 x 100: about a minute
    python benchmarks/bench_gsmn.py                  # 200 x 1,000
    python benchmarks/bench_gsmn.py --size 1000x5000 --threads 1   # Flickr30K test size (the report size; hours)

For each head it prints: the official-style loop's time (``itm_models.baselines.gsmn``: per caption, both graphs,
the released data movement; timed on a subset of ``--official-subset`` images x captions, extrapolated linearly by
pairs, marked "~") fed float32 and, for bfloat16 rows, fed bfloat16 inputs under CPU autocast to bfloat16; ours
(``GSMNSimilarity.sims`` with float32 or bfloat16 inputs: GSMN's matching kernel computes in float32 either way on
the CPU), the speed-up over each, ours against the hardware limit, the peak extra memory of one ``sims`` call in a
fresh process (the (N_img, N_cap) output counts), and the largest score difference to the float32 official-style
loop on the subset. Ensemble rows add the dense and sparse repeats pairwise.

Hardware limit ("bare GEMM, same FLOPs"): the released algorithm's irreducible matrix products per pair are the
score tile (2 K L d FLOPs) and the two attended contexts (2 K L d each), 6 K L d in all; the limit is 3 x the time
of the bare packed score product (N_img K x d) @ (d x sum L) in the inputs' dtype, by the fastest of torch.mm,
oneDNN linear and brgemm (named), measured in the same run. (Ours never forms the contexts: it runs the score
product as 16 block products and reads |context|^2 from Gram matrices, so it can beat that limit.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from itm_models.gsmn import GSMNSimilarity  # noqa: E402
from itm_models.baselines.gsmn import official_style_sims  # noqa: E402
from itm_models.data.synthetic import synthetic_boxes, synthetic_parses  # noqa: E402
from common import (COMPARISON_HEADERS, Timing, bare_product_timing, comparison_cells, finish,  # noqa: E402
                    matched_features, parse_size, peak_memory, print_table, standard_parser, start, timings)

VARIANTS = ("dense", "sparse")


def make_head(variant: str, seed: int = 0) -> GSMNSimilarity:
    """A GSMN head with seeded random official-style weights, eval mode."""
    torch.manual_seed(seed + VARIANTS.index(variant))
    return GSMNSimilarity(variant).eval()


def gsmn_inputs(n_img: int, n_cap: int):
    """(images, captions, lens, boxes, image sizes, parses) of a synthetic gallery."""
    images, captions, lens = matched_features(n_img, n_cap)
    boxes, sizes = synthetic_boxes(n_img)
    return images, captions, lens, torch.from_numpy(boxes), torch.from_numpy(sizes), synthetic_parses(lens.tolist())


def gsmn_call(variant: str, n_img: int, n_cap: int, dtype_name: str):
    """Builder for ``common.peak_memory``: a head, the gallery and the all-pairs ``sims`` call in ``dtype_name``."""
    head = make_head(variant)
    images, captions, lens, boxes, sizes, parses = gsmn_inputs(n_img, n_cap)
    dtype = getattr(torch, dtype_name)
    return lambda: head.sims(images, captions, lens, boxes, sizes, parses, dtype=dtype)


def official_timing(head, inputs, sub_img: int, sub_cap: int, dtype: torch.dtype, repeats: int, warmup: int):
    """The official-style loop on the first sub_img x sub_cap pairs fed ``dtype`` (bfloat16: autocast), extrapolated
    linearly by pairs; and its last scores (float32)."""
    images, captions, lens, boxes, sizes, parses = inputs
    args = (images[:sub_img].to(dtype), captions[:sub_cap].to(dtype), lens[:sub_cap], boxes[:sub_img],
            sizes[:sub_img], parses[:sub_cap])
    out = {}

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out["scores"] = official_style_sims(head, *args).float()
    t = timings(run, repeats=repeats, warmup=warmup)
    return t.scaled(images.shape[0] * captions.shape[0] / (sub_img * sub_cap)), out["scores"]


def run_gsmn(n_img: int, n_cap: int, official_subset=(100, 100), repeats: int = 3, warmup: int = 1,
             memory: bool = True, dtypes=("float32", "bfloat16")) -> str:
    """Time the dense, sparse and ensemble GSMN heads on n_img x n_cap synthetic pairs; print and return the table."""
    inputs = gsmn_inputs(n_img, n_cap)
    images, captions, lens = inputs[:3]
    bare = {name: bare_product_timing(images.to(getattr(torch, name)), captions.to(getattr(torch, name)), lens,
                                      repeats=repeats).scaled(3.0) for name in dtypes}
    sub_img, sub_cap = (min(n_img, official_subset[0]), min(n_cap, official_subset[1]))
    rows, runs = [], {}
    for variant in VARIANTS:
        head = make_head(variant)
        off32, off_scores = official_timing(head, inputs, sub_img, sub_cap, torch.float32, repeats, warmup)
        for name in dtypes:
            dtype = getattr(torch, name)
            off_same = None if dtype == torch.float32 else official_timing(head, inputs, sub_img, sub_cap, dtype,
                                                                           repeats, warmup)[0]
            result = {}

            def ours():
                result["scores"] = head.sims(*inputs, dtype=dtype, progress=True)
            t = timings(ours, repeats=repeats, warmup=warmup)
            diff = (result["scores"][:sub_img, :sub_cap].float() - off_scores).abs().max().item()
            runs[variant, name] = (off32, off_same, t)
            mem = peak_memory(gsmn_call, variant, n_img, n_cap, name, enabled=memory)
            rows.append([f"{n_img}x{n_cap}", variant, name, *comparison_cells(off32, off_same, t),
                         bare[name].cell(".3g"), bare[name].fraction(t), mem, f"{diff:.1e}"])
            print(" | ".join(rows[-1]), flush=True)
    add = lambda a, b: None if a is None else Timing(tuple(x + y for x, y in zip(a.times, b.times)))  # noqa: E731
    for name in dtypes:
        (d32, dsame, dt), (s32, ssame, st) = runs["dense", name], runs["sparse", name]
        off32, off_same, t = add(d32, s32), add(dsame, ssame), add(dt, st)
        ens_bare = bare[name].scaled(2.0)
        rows.append([f"{n_img}x{n_cap}", "ensemble", name, *comparison_cells(off32, off_same, t),
                     ens_bare.cell(".3g"), ens_bare.fraction(t), "-", "-"])
    table = print_table(
        f"GSMN all-pairs evaluation, {n_img} images x {n_cap} captions (K = 36, d = 1024, lengths 8..20; seconds, "
        f"{repeats} repeats); official-style timed on {sub_img} x {sub_cap} and extrapolated by pairs (~)",
        ["size", "head", "inputs", *COMPARISON_HEADERS, "bare GEMM s x3 (winner)", "fraction of GEMM limit",
         "peak extra MiB", "max abs diff to official fp32"], rows)
    for name in dtypes:
        print(f"# {name} (x3): {bare[name].note()}")
    return table


def main(argv=None):
    p = standard_parser(__doc__, repeats=3)
    p.add_argument("--size", default="200x1000", help="N_imgxN_cap (report: 1000x5000)")
    p.add_argument("--official-subset", type=int, nargs=2, default=(100, 100), metavar=("IMAGES", "CAPTIONS"))
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args(argv)
    n_img, n_cap = parse_size("20x100" if args.quick else args.size)
    start("bench_gsmn", args)
    run_gsmn(n_img, n_cap, args.official_subset, args.repeats, args.warmup, not args.no_memory,
             tuple(args.dtypes.split(",")))
    finish()


if __name__ == "__main__":
    main()
