"""The headline benchmark: all-pairs evaluation (similarity matrix + recall metrics) of SCAN and of the SGRAF heads
(SGR, SAF) on a synthetic Flickr30K-sized test set (1,000 images x 5,000 captions, K = 36, d = 1024), ours against
the official-style loop.

    python benchmarks/bench_eval.py --models scan           # SCAN t2i/i2t at 1,000 x 5,000: about 15 min on 2 cores
    python benchmarks/bench_eval.py                         # + SGR, SAF, GSMN at 1,000 x 5,000: hours on 2 cores
    python benchmarks/bench_eval.py --quick                 # SCAN 200 x 1,000, SGRAF and GSMN 20 x 100
    python benchmarks/bench_eval.py --models sgr,saf --threads 1
    python benchmarks/bench_eval.py --models gsmn           # GSMN dense, sparse, ensemble (benchmarks/bench_gsmn.py)
    python benchmarks/bench_eval.py --models tshsr          # TSHSR (our design) vs its per-pair loop (bench_tshsr.py)

Every table: times are the median (min-max) of ``--repeats`` runs after warm-up; the official-style loop is
timed fed float32 and, for bfloat16 rows, fed bfloat16 (SGRAF, GSMN: under CPU autocast), and the speed-up over
each is shown; the hardware limit is the fastest of torch.mm, oneDNN linear and brgemm for the same FLOPs and
dtype, timed in the same run and named; peak extra memory is one call in a fresh process (output counts).

SCAN rows (t2i and i2t, float32 and bfloat16): the official-style loop's time (on a subset, extrapolated linearly
by pairs, and marked "~"), ours, the speed-ups, the fraction of the bare packed GEMM (N_img K x d) @ (d x sum L),
peak extra memory, and whether the recall metrics are identical to the reference's (float64 scores of the same
pairs). It saves a log-log plot of SCAN's time against gallery size.

SGRAF rows (SGR and SAF heads, d = 1024, s = 256, 3 SGR steps): the head is first TRAINED briefly (a few dozen
Adam steps, well under a minute) on separate synthetic embeddings with a ground truth (each word a noisy copy of a
region of its image, with a weak signal so that recall is neither chance nor 100), so that scores are spread like
a trained model's rather than sitting in a random head's narrow band. Then: the official-style loop
(``itm_models.baselines.sgraf.official_style_sims``: one official shard of 100 images x 100 captions spread over the
gallery, extrapolated linearly by pairs, "~"), ours (``SGRAFSimilarity.sims``
with float32 or bfloat16 matrix products, + metrics), the speed-ups, the fraction of the bare-GEMM limit, peak
extra memory, R@1 in both directions and, for bfloat16, its R@1 difference to float32 (bfloat16 minus float32).

"Same FLOPs" for SGRAF: the FLOPs of the computation the model defines, per pair (image, caption of L words, n =
L + 1 graph nodes): the t2i attention 4 K L d (scores and attended vectors), W_loc on every word and W_glo on the
global node 2 d s n, then SGR: per step 3 x 2 s^2 n (query, key, W_g) + 2 x 2 n^2 s (Q K^T, A X); or SAF: 4 s n
(gate, weighted sum); plus the score 2 s. Summed over all pairs with their real lengths; at L = 12 that is the
24.4 (SGR) and 8.6 (SAF) MFLOP per pair of SEMANTICS.md (``bench_sgraf.sgraf_flops``). The bare-GEMM time is
those FLOPs at the rate of the fastest product on (8192 x d) @ (d x s) in the same dtype (the shape of W_loc),
timed in the same run; the fraction is bare-GEMM time / ours (1.0 = as fast as if all the work were one large GEMM). Our SGR
path does fewer FLOPs than the model defines (query and key folded into one s x s product; the last step on the
global node only), printed below the table, so its fraction can exceed 1.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itm_kernels  # noqa: E402
from itm_models.losses import ContrastiveLoss  # noqa: E402
from itm_models.eval.metrics import format_metrics_table, recall  # noqa: E402
from itm_models.sgraf import SGRAFSimilarity  # noqa: E402
from bench_sgraf import D, K, S, SGR_STEPS, official_sgraf_timing, sgraf_flops  # noqa: E402
from bench_xattn_sim import official_timing  # noqa: E402
from common import (COMPARISON_HEADERS, SCAN_LAMBDAS, bare_product_timing, comparison_cells, finish,  # noqa: E402
                    gemm_yardstick, matched_features, peak_memory, print_table, standard_parser, start, timings)

LAMBDAS = SCAN_LAMBDAS
SGRAF_HEADS = {"sgr": "SGR", "saf": "SAF"}
MODELS = ("scan", *SGRAF_HEADS, "gsmn", "tshsr")
# Weight of the grounding region in each synthetic word of the SGRAF rows (noise weight 1): weak enough that a
# briefly trained head ranks well but not perfectly (matched_features' 0.3 makes every metric 100 at once).
SGRAF_SIGNAL = 0.1
SGRAF_TRAIN_IMAGES = 256


def evaluate(images, captions, lens, direction, backend="auto"):
    lam1, lam2 = LAMBDAS[direction]
    sims = itm_kernels.xattn_sim(images, captions, lens, direction=direction, lambda_softmax=lam1,
                                 lambda_lse=lam2, backend=backend)
    return sims, recall(sims.cpu().numpy())


def scan_eval_call(size: int, direction: str, dtype_name: str, device: str = "cpu"):
    """Builder for ``common.peak_memory``: the inputs of one SCAN row and the call that evaluates them."""
    images, captions, lens = matched_features(size, 5 * size, device=device)
    images, captions = images.to(getattr(torch, dtype_name)), captions.to(getattr(torch, dtype_name))
    return lambda: evaluate(images, captions, lens, direction)


# ------------------------------------------------------------------------------------------------------------------
# SGRAF rows
# ------------------------------------------------------------------------------------------------------------------

def grounded_features(n_img: int, n_cap: int, *, signal: float = SGRAF_SIGNAL, min_len: int = 8, max_len: int = 20,
                      seed: int = 0, device="cpu"):
    """Synthetic embeddings with a ground truth, caption c describing image c * n_img // n_cap: every word is
    l2norm(signal * region + noise) for a random region of its image (``common.matched_features`` with noise 1).

    Returns: images (n_img, K, D) float32, captions (n_cap, max_len, D) float32, lengths (n_cap,) int64 uniform
    in min_len..max_len.
    """
    return matched_features(n_img, n_cap, K=K, d=D, min_len=min_len, max_len=max_len, seed=seed, device=device,
                            signal=signal, noise=1.0)


def train_sgraf_head(module: str, *, steps: int, batch: int, seed: int = 0, device="cpu"):
    """A full-size SGRAF head (D, S) trained for ``steps`` Adam steps (lr 1e-3, grad clip 2, summed hinge loss with
    margin 0.2: hardest negatives leave a fresh head's narrow score band too slowly for a short run) on batches of
    ``batch`` distinct images with one of their captions each, from :func:`grounded_features` (seed + 1, so never
    the evaluation set). Returns (head in eval mode, one-line summary)."""
    torch.manual_seed(seed)
    head = SGRAFSimilarity(D, S, module, SGR_STEPS).to(device)
    images, captions, lens = grounded_features(SGRAF_TRAIN_IMAGES, 5 * SGRAF_TRAIN_IMAGES, seed=seed + 1,
                                               device=device)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    criterion = ContrastiveLoss(0.2, max_violation=False)
    g = torch.Generator().manual_seed(seed)
    head.train()
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        img = torch.randperm(SGRAF_TRAIN_IMAGES, generator=g)[:batch]
        cap = (img * 5 + torch.randint(0, 5, (len(img),), generator=g)).to(device)
        cap_lens = lens[cap]
        loss = criterion(head(images[img.to(device)], captions[cap, : int(cap_lens.max())], cap_lens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 2.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    summary = (f"# trained {module} head: {steps} steps of {batch} pairs in {time.perf_counter() - t0:.1f} s, "
               f"loss {losses[0]:.1f} -> {losses[-1]:.1f}" if losses else f"# {module} head untrained")
    return head.eval(), summary


def evaluate_sgraf(head: SGRAFSimilarity, images, captions, lens, dtype: torch.dtype):
    """Our all-pairs SGRAF scores with ``dtype`` matrix products, and their recall metrics."""
    sims = head.sims(images, captions, lens, dtype=dtype)
    return sims, recall(sims.cpu().numpy())


def sgraf_eval_call(module: str, state_path: str, n_img: int, dtype_name: str):
    """Builder for ``common.peak_memory``: the trained head (loaded from ``state_path``), the evaluation gallery and
    the call that scores all pairs and computes the metrics."""
    head = SGRAFSimilarity(D, S, module, SGR_STEPS)
    head.load_state_dict(torch.load(state_path))
    head.eval()
    images, captions, lens = grounded_features(n_img, 5 * n_img)
    dtype = getattr(torch, dtype_name)
    head.sims(images[:2], captions[:8], lens[:8], dtype=dtype)              # first-call allocations
    return lambda: evaluate_sgraf(head, images, captions, lens, dtype)


def _r1_difference(metrics: dict, base: dict | None) -> str:
    if base is None or metrics is base:
        return "-"
    return ", ".join(f"{k[:3]} {metrics[k] - base[k]:+.1f}" for k in ("i2t_r1", "t2i_r1"))


def sgraf_rows(key: str, n_img: int, args, device, yardsticks: dict, notes: list) -> list[list[str]]:
    """Table rows of one SGRAF head (``key`` "sgr" | "saf") at n_img x 5 n_img, one per dtype."""
    module = SGRAF_HEADS[key]
    head, summary = train_sgraf_head(module, steps=args.train_steps, batch=args.train_batch, device=device)
    print(summary, flush=True)
    images, captions, lens = grounded_features(n_img, 5 * n_img, device=device)
    max_captions = max(1, args.official_pairs // min(n_img, 100))
    off32 = official_sgraf_timing(head, images, captions, lens, torch.float32, max_captions=max_captions,
                                  repeats=args.repeats)
    model_flops, _ = sgraf_flops(lens, n_img, module)
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        state_path = os.path.join(tmp, f"{module}.pt")
        torch.save(head.state_dict(), state_path)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            if dtype_name not in yardsticks:
                yardsticks[dtype_name] = gemm_yardstick(1.0, dtype, 8192, D, S, repeats=args.repeats,
                                                        device=device)
                notes.append(f"# {dtype_name} per FLOP: {yardsticks[dtype_name].note()}")
            bare = yardsticks[dtype_name].scaled(model_flops)
            off_same = None if dtype == torch.float32 else official_sgraf_timing(
                head, images, captions, lens, dtype, max_captions=max_captions, repeats=args.repeats)
            head.sims(images[:2], captions[:8], lens[:8], dtype=dtype)          # first-call allocations
            result = {}

            def run():
                result["metrics"] = evaluate_sgraf(head, images, captions, lens, dtype)[1]
            ours = timings(run, repeats=args.repeats, warmup=0)
            metrics = result["metrics"]
            base = metrics if dtype == torch.float32 else base
            mem = peak_memory(sgraf_eval_call, module, state_path, n_img, dtype_name, device=device,
                              enabled=not args.no_memory)
            rows.append([f"{n_img}x{5 * n_img}", module, dtype_name, *comparison_cells(off32, off_same, ours),
                         bare.cell(".3g"), bare.fraction(ours), mem,
                         f"{metrics['i2t_r1']:.1f} / {metrics['t2i_r1']:.1f}", _r1_difference(metrics, base)])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def run_sgraf(keys: list[str], n_img: int, args, device) -> None:
    """Print the SGRAF table (heads ``keys``) at n_img x 5 n_img, with the FLOP counts under it."""
    rows, yardsticks, notes = [], {}, []
    for key in keys:
        rows += sgraf_rows(key, n_img, args, device, yardsticks, notes)
    lens = grounded_features(n_img, 5 * n_img)[2]
    per_pair = {m: [f / (n_img * len(lens)) / 1e6 for f in sgraf_flops(lens, n_img, m)] for m in ("SGR", "SAF")}
    print_table(f"SGRAF evaluation: similarity matrix + metrics (seconds, median (min-max) of {args.repeats} runs; "
                f"'~' = official-style loop on min(N_img, 100) x {args.official_pairs} // that captions spread over "
                f"the gallery, extrapolated linearly by pairs; trained synthetic heads d={D}, s={S})",
                ["gallery", "head", "dtype", *COMPARISON_HEADERS, "bare GEMM s of the model FLOPs (winner)",
                 "fraction of GEMM limit", "peak extra MiB", "R@1 i2t / t2i", "R@1 vs float32"], rows)
    print(f"# model FLOPs per pair (mean L {float(lens.float().mean()):.1f}): SGR {per_pair['SGR'][0]:.1f} M, SAF "
          f"{per_pair['SAF'][0]:.1f} M; ours SGR {per_pair['SGR'][1]:.1f} M")
    print("\n".join(notes))


# ------------------------------------------------------------------------------------------------------------------
# SCAN rows
# ------------------------------------------------------------------------------------------------------------------

def save_plot(curves: dict, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, pts in curves.items():
        xs, ys = zip(*sorted(pts))
        ax.loglog(xs, ys, marker="o", label=label, linestyle="--" if "official" in label else "-")
    ax.set_xlabel("gallery size (image-caption pairs)")
    ax.set_ylabel("seconds (similarity matrix + metrics)")
    ax.set_title("SCAN all-pairs evaluation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"plot saved to {path}"


def run_scan(n_img: int, args, device) -> None:
    """Print the SCAN table (``args.directions`` x ``args.dtypes``) at n_img x 5 n_img, timing smaller galleries
    too for the plot. Times: median (min-max) of ``args.repeats`` runs; memory: one fresh process per row."""
    sizes = sorted({max(20, n_img // 10), max(20, n_img // 4), n_img})
    rows, curves, shown, notes = [], {}, False, []
    for direction in args.directions.split(","):
        for size in sizes:
            images32, captions32, lens = matched_features(size, 5 * size, device=device)
            off = official_timing(images32, captions32, lens, direction, args.official_pairs, torch.float32,
                                  repeats=args.repeats if size == n_img else 1, warmup=args.warmup)[0]
            curves.setdefault(f"official-style {direction} (fp32 loop)", []).append((size * 5 * size, off.median))
            truth = None
            if size == n_img and not args.no_check:
                truth = evaluate(images32.double(), captions32.double(), lens, direction)[1]
            for dtype_name in args.dtypes.split(","):
                dtype = getattr(torch, dtype_name)
                images, captions = images32.to(dtype), captions32.to(dtype)
                metrics = evaluate(images, captions, lens, direction)[1]            # also the warm-up
                ours = timings(lambda: evaluate(images, captions, lens, direction), repeats=args.repeats,
                               warmup=max(0, args.warmup - 1))
                curves.setdefault(f"ours {direction} {dtype_name}", []).append((size * 5 * size, ours.median))
                if size != n_img:
                    continue
                off_same = None if dtype == torch.float32 else official_timing(
                    images32, captions32, lens, direction, args.official_pairs, dtype, repeats=args.repeats,
                    warmup=args.warmup)[0]
                mem = peak_memory(scan_eval_call, size, direction, dtype_name, device=device,
                                  enabled=not args.no_memory)
                bare = bare_product_timing(images, captions, lens, repeats=args.repeats)
                notes.append(f"# {size} {direction} {dtype_name}: {bare.note()}")
                same = "n/a" if truth is None else ("yes" if metrics == truth else
                                                    f"no (rsum {metrics['rsum']:.2f} vs {truth['rsum']:.2f})")
                rows.append([f"{size}x{5 * size}", direction, dtype_name, *comparison_cells(off, off_same, ours),
                             bare.cell(".3g"), bare.fraction(ours), mem,
                             f"{size * 5 * size * 4 / 2**20:.1f}", f"{metrics['rsum']:.1f}", same])
                print(" | ".join(rows[-1]), flush=True)
                if not shown:
                    print(format_metrics_table(metrics, title=f"metrics ({direction}, {dtype_name}, synthetic)"))
                    shown = True
    print_table(f"SCAN evaluation: similarity matrix + metrics (seconds, median (min-max) of {args.repeats} runs; "
                f"'~' = official-style loop timed on at most {args.official_pairs} pairs and extrapolated linearly "
                "by pairs)",
                ["gallery", "dir", "dtype", *COMPARISON_HEADERS, "bare GEMM s (winner)",
                 "fraction of GEMM limit", "peak extra MiB", "fp32 output MiB", "rsum", "metrics identical to float64"],
                rows)
    print("\n".join(notes))
    print(save_plot(curves, Path(args.plot)))


def main(argv=None):
    parser = standard_parser(__doc__, repeats=3)
    parser.add_argument("--n-img", type=int, default=1000)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of scan,sgr,saf,gsmn,tshsr")
    parser.add_argument("--directions", default="t2i,i2t", help="SCAN directions")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--official-pairs", type=int, default=10000)
    parser.add_argument("--no-check", action="store_true", help="skip SCAN's float64 metrics check at full size")
    parser.add_argument("--train-steps", type=int, default=30, help="Adam steps that train each SGRAF head")
    parser.add_argument("--train-batch", type=int, default=24, help="pairs per SGRAF training step")
    parser.add_argument("--plot", default="benchmarks/out/bench_eval.png")
    args = parser.parse_args(argv)
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        parser.error(f"--models takes a comma-separated subset of {','.join(MODELS)}, got {args.models!r}")
    n_img = 200 if args.quick else args.n_img
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = itm_kernels._common.dispatch.choose_backend("auto", torch.device(device))
    start(f"bench_eval | backend {backend}", args)
    if "scan" in models:
        run_scan(n_img, args, device)
    heads = [m for m in models if m in SGRAF_HEADS]
    if heads:
        run_sgraf(heads, 20 if args.quick else args.n_img, args, device)
    if "gsmn" in models:
        from bench_gsmn import run_gsmn
        run_gsmn(20 if args.quick else n_img, 100 if args.quick else 5 * n_img, official_subset=(100, 100),
                 repeats=args.repeats, warmup=args.warmup, memory=not args.no_memory,
                 dtypes=tuple(args.dtypes.split(",")))
    if "tshsr" in models:
        from bench_tshsr import run_tshsr_eval
        run_tshsr_eval(20 if args.quick else args.n_img, repeats=args.repeats)
    finish()


if __name__ == "__main__":
    main()
