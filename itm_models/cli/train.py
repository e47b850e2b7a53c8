"""Train SCAN, SGRAF (SGR / SAF) or GSMN (dense / sparse) on precomputed region features (the official ``train.py``
recipes), or TSHSR (our design after the paper's abstract; SGRAF's SGR recipe by our choice).

CLI: ``python -m itm_models.cli.train --data DIR --out DIR [--model scan | --model sgraf --module SGR|SAF |
--model gsmn --variant dense|sparse [--propagate] [--recipe f30k|coco] | --model tshsr [--streams t2i,i2t]
[--levels global,intermediate,local]] [options]`` (``--help`` lists them).
The console script ``itm-train`` is :func:`cli`; the training itself is :func:`itm_models.train.train`.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..data import load_vocab
from ..data.gsmn import load_split_caption_ids
from ..gsmn import GSMNConfig
from ..gsmn import recipe as gsmn_recipe
from ..scan import AGG_FUNCS, CROSS_ATTN, RAW_FEATURE_NORMS, SCANConfig
from ..sgraf import MODULES as SGRAF_MODULES
from ..sgraf import SGRAFConfig, recipe_schedule
from ..train.loop import train
from ..tshsr import FUSIONS as TSHSR_FUSIONS
from ..tshsr import LEVELS as TSHSR_LEVELS
from ..tshsr import STREAMS as TSHSR_STREAMS
from ..tshsr import TSHSRConfig
from .args import (backend_name, device_name, finite_float, nonnegative_float, nonnegative_int, output_dir,
                   positive_float, positive_int, run_main)

__all__ = ["main", "cli"]

# SCAN's Flickr30K (num_epochs, lr_update); SGRAF's come from itm_models.sgraf.recipe_schedule.
SCAN_SCHEDULE = (30, 15)
# Options of some models only, with their defaults (the parser's default is None, so that giving one to another
# model is an error rather than silently ignored). GSMN's None defaults come from its recipe (--recipe).
_SCAN_ONLY = {"direction": "t2i", "agg": "LogSumExp", "lambda_softmax": 9.0, "lambda_lse": 6.0,
              "norm": "clipped_l2norm", "precomp_enc_type": "basic", "backend": "auto"}
_SGRAF_ONLY = {"module": "SGR", "sim_dim": 256, "sgr_step": 3}
_GSMN_ONLY = {"variant": "dense", "propagate": False, "lambda_softmax": None, "recipe": "f30k", "allow_pickle": False}
# TSHSR shares sim_dim and sgr_step with SGRAF; its recipe is SGRAF's SGR one (our choice: none is published).
_TSHSR_ONLY = {"sim_dim": 256, "sgr_step": 3, "streams": "t2i,i2t", "levels": "global,intermediate,local",
               "phrase_window": 3, "region_groups": 4, "fusion": "sum"}
_MODEL_OPTIONS = {"scan": _SCAN_ONLY, "sgraf": _SGRAF_ONLY, "gsmn": _GSMN_ONLY, "tshsr": _TSHSR_ONLY}
# SCAN's and SGRAF's (batch_size, learning_rate) when not given (GSMN's come from its recipe).
_DEFAULT_BATCH_LR = (128, 2e-4)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m itm_models.cli.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with {train,dev}_ims.npy, {train,dev}_caps.txt (GSMN: "
                   "{train,dev}_ims.npy, _ims_bbx.npy, _ims_size.npy, _precaps_stan.txt, _caps.json)")
    p.add_argument("--vocab", default=None, help="vocabulary JSON (default: DATA/vocab.json; GSMN: optional, "
                   "vocab_size = max(its size, largest caption id + 1))")
    p.add_argument("--out", required=True, type=output_dir,
                   help="output folder for checkpoint_last.pt / checkpoint_best.pt (new or empty, unless --resume or "
                        "--overwrite)")
    p.add_argument("--model", choices=("scan", "sgraf", "gsmn", "tshsr"), default="scan",
                   help="model to train (default scan; tshsr: our design after the TSHSR abstract)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="number of epochs (default: the official Flickr30K recipe of the model: SCAN 30, SGR 40, "
                        "SAF 30, GSMN 30; COCO: SCAN and SGRAF 20, GSMN --recipe coco 20)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default 128 (GSMN: 64 Flickr30K, 32 COCO)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="initial learning rate (default 2e-4; SCAN COCO README and GSMN --recipe coco: 5e-4)")
    p.add_argument("--lr-update", type=positive_int, default=None,
                   help="epochs per 10x learning-rate decay (default: SCAN 15, SGR 30, SAF 20, GSMN 15; COCO: 10, "
                        "GSMN 5)")
    p.add_argument("--embed-size", type=positive_int, default=1024)
    p.add_argument("--word-dim", type=positive_int, default=300)
    p.add_argument("--num-layers", type=positive_int, default=1)
    p.add_argument("--img-dim", type=positive_int, default=2048)
    scan = p.add_argument_group("SCAN only (--model scan)")
    scan.add_argument("--direction", choices=CROSS_ATTN, default=None, help="cross attention direction (default t2i)")
    scan.add_argument("--agg", choices=(*AGG_FUNCS, *AGG_FUNCS.values()), default=None,
                      help="aggregation (default LogSumExp)")
    scan.add_argument("--lambda-softmax", type=nonnegative_float, default=None,
                      help="SCAN and GSMN: attention temperature (SCAN lambda1, default 9; README: 9 for t2i, 4 for "
                           "i2t; GSMN: 20 Flickr30K, 10 COCO)")
    scan.add_argument("--lambda-lse", type=nonnegative_float, default=None,
                      help="lambda2 (default 6; README: 6 t2i; i2t 5 Flickr30K, 20 COCO)")
    scan.add_argument("--norm", choices=RAW_FEATURE_NORMS, default=None,
                      help="raw_feature_norm (default clipped_l2norm)")
    scan.add_argument("--precomp-enc-type", choices=("basic", "weight_norm"), default=None,
                      help="image encoder (default basic)")
    scan.add_argument("--backend", type=backend_name, default=None,
                      help="itm_kernels.xattn_sim backend (auto, cpu, torch, cuda, triton; default auto)")
    sgraf = p.add_argument_group("SGRAF (--model sgraf; --sim-dim and --sgr-step also --model tshsr)")
    sgraf.add_argument("--module", choices=SGRAF_MODULES, default=None,
                       help="similarity head: SGR (graph reasoning) or SAF (attention filtration); default SGR")
    sgraf.add_argument("--sim-dim", type=positive_int, default=None, help="similarity vector size s (default 256)")
    sgraf.add_argument("--sgr-step", type=positive_int, default=None, help="SGR reasoning steps (default 3)")
    gsmn = p.add_argument_group("GSMN only (--model gsmn)")
    gsmn.add_argument("--variant", choices=("dense", "sparse"), default=None,
                      help="textual graph: dense (all word pairs) or sparse (dependency parse); default dense")
    gsmn.add_argument("--propagate", action=argparse.BooleanOptionalAction, default=None,
                      help="the paper's propagation between neighbours (default off: the released code)")
    gsmn.add_argument("--recipe", choices=("f30k", "coco"), default=None,
                      help="official settings for --lr, --epochs, --lr-update, --batch-size, --lambda-softmax not "
                           "given: f30k 2e-4 / 30 / 15 / 64 / 20 (default), coco 5e-4 / 20 / 5 / 32 / 10")
    gsmn.add_argument("--allow-pickle", action="store_true", default=None,
                      help="read pickled {split}_ims_size.npy files (the released layout; trusted files only)")
    tshsr = p.add_argument_group("TSHSR only (--model tshsr; our design, SGRAF's SGR recipe by default)")
    tshsr.add_argument("--streams", default=None, help="comma-separated subset of t2i,i2t (default both)")
    tshsr.add_argument("--levels", default=None, help="comma-separated subset of global,intermediate,local with "
                       "local (default all three)")
    tshsr.add_argument("--phrase-window", type=positive_int, default=None, help="words per phrase (default 3)")
    tshsr.add_argument("--region-groups", type=positive_int, default=None, help="region groups of the i2t stream (default 4)")
    tshsr.add_argument("--fusion", choices=TSHSR_FUSIONS, default=None, help="stream fusion (default sum)")
    p.add_argument("--bi-gru", action=argparse.BooleanOptionalAction, default=True,
                   help="bidirectional GRU, halves averaged (README setting; default on)")
    p.add_argument("--max-violation", action=argparse.BooleanOptionalAction, default=True,
                   help="hardest negatives only (README setting; default on)")
    p.add_argument("--margin", type=finite_float, default=0.2)
    p.add_argument("--grad-clip", type=nonnegative_float, default=2.0, help="global norm clip (0: none)")
    p.add_argument("--no-imgnorm", action="store_true")
    p.add_argument("--no-txtnorm", action="store_true")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue from OUT/checkpoint_last.pt, or from PATH")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a non-empty OUT (its checkpoint_last.pt / checkpoint_best.pt are removed "
                        "first); with --resume, replace a checkpoint_best.pt of another run")
    p.add_argument("--device", type=device_name, default="auto",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--workers", type=nonnegative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--val-every-epoch", type=nonnegative_int, default=1, metavar="N",
                   help="validate on dev every N epochs and after the last (0: never)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def _resolve_model_options(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Fill the chosen model's own options and its schedule defaults in ``a``; an option of another model only is
    a usage error (exit status 2)."""
    own = _MODEL_OPTIONS[a.model]
    others = [name for model, options in _MODEL_OPTIONS.items() if model != a.model for name in options]
    given = [name for name in dict.fromkeys(others) if name not in own and getattr(a, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        parser.error(f"{flags} {'does' if len(given) == 1 else 'do'} not apply to --model {a.model}")
    for name, default in own.items():
        if getattr(a, name) is None:
            setattr(a, name, default)
    if a.model == "tshsr":
        _check_tshsr_lists(parser, a)
    if a.model == "gsmn":
        r = gsmn_recipe(a.recipe)
        epochs, lr_update, batch_size, lr = r["num_epochs"], r["lr_update"], r["batch_size"], r["learning_rate"]
        a.lambda_softmax = r["lambda_softmax"] if a.lambda_softmax is None else a.lambda_softmax
    else:
        epochs, lr_update = SCAN_SCHEDULE if a.model == "scan" else recipe_schedule(a.module or "SGR")
        batch_size, lr = _DEFAULT_BATCH_LR
    a.epochs = epochs if a.epochs is None else a.epochs
    a.lr_update = lr_update if a.lr_update is None else a.lr_update
    a.batch_size = batch_size if a.batch_size is None else a.batch_size
    a.lr = lr if a.lr is None else a.lr


def _check_tshsr_lists(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """--streams / --levels: comma-separated names of TSHSR's streams / levels (levels with local), else a usage
    error."""
    for flag, value, allowed in (("--streams", a.streams, TSHSR_STREAMS), ("--levels", a.levels, TSHSR_LEVELS)):
        names = [x.strip() for x in value.split(",") if x.strip()]
        if not names or any(n not in allowed for n in names) or len(set(names)) != len(names):
            parser.error(f"{flag} takes distinct comma-separated names from {','.join(allowed)}, got {value!r}")
    if "local" not in a.levels.split(","):
        parser.error(f"--levels must include local, got {a.levels!r}")


def _config_from_args(a: argparse.Namespace, vocab_size: int) -> SCANConfig | SGRAFConfig | GSMNConfig | TSHSRConfig:
    """The config of the chosen model from resolved CLI arguments (see :func:`_resolve_model_options`)."""
    shared = dict(vocab_size=vocab_size, word_dim=a.word_dim, embed_size=a.embed_size, num_layers=a.num_layers,
                  bi_gru=a.bi_gru, img_dim=a.img_dim, no_imgnorm=a.no_imgnorm, no_txtnorm=a.no_txtnorm,
                  margin=a.margin, max_violation=a.max_violation, grad_clip=a.grad_clip, learning_rate=a.lr,
                  lr_update=a.lr_update, num_epochs=a.epochs, batch_size=a.batch_size)
    if a.model == "sgraf":
        return SGRAFConfig(module_name=a.module, sim_dim=a.sim_dim, sgr_step=a.sgr_step, **shared)
    if a.model == "tshsr":
        names = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())  # noqa: E731
        return TSHSRConfig(sim_dim=a.sim_dim, sgr_step=a.sgr_step, streams=names(a.streams), levels=names(a.levels),
                           phrase_window=a.phrase_window, region_groups=a.region_groups, fusion=a.fusion, **shared)
    if a.model == "gsmn":
        return GSMNConfig(variant=a.variant, propagate=a.propagate, lambda_softmax=a.lambda_softmax, **shared)
    return SCANConfig(precomp_enc_type=a.precomp_enc_type, raw_feature_norm=a.norm, agg_func=a.agg,
                      cross_attn=a.direction, lambda_softmax=a.lambda_softmax, lambda_lse=a.lambda_lse, **shared)


def _gsmn_vocab(a: argparse.Namespace):
    """GSMN's (vocabulary or None, vocab_size): its captions are ids (``{split}_precaps_stan.txt``), so the
    vocabulary is optional: vocab_size = max(its size if one is given or DATA/vocab.json exists, the largest id of
    the train (and, when validating, dev) captions + 1)."""
    splits = ["train"] + (["dev"] if a.val_every_epoch else [])
    top = max(max(max(c) for c in load_split_caption_ids(a.data, split)) for split in splits)
    voc = None
    if a.vocab is not None or os.path.isfile(os.path.join(a.data, "vocab.json")):
        voc = load_vocab(a.vocab, a.data)
    return voc, max(top + 1, len(voc) if voc is not None else 0)


def main(argv=None) -> dict:
    """CLI entry point (``python -m itm_models.cli.train``); returns :func:`train`'s result."""
    parser = _parser()
    a = parser.parse_args(argv)
    _resolve_model_options(parser, a)
    if a.model == "gsmn":
        voc, vocab_size = _gsmn_vocab(a)
    else:
        voc = load_vocab(a.vocab, a.data)
        vocab_size = len(voc)
    config = _config_from_args(a, vocab_size)
    result = train(config, a.data, a.out, vocab=voc, seed=a.seed, device=a.device, backend=a.backend or "auto",
                   resume=a.resume, workers=a.workers, val_every_epoch=a.val_every_epoch,
                   progress=not a.no_progress, allow_pickle=bool(a.allow_pickle), overwrite=a.overwrite)
    print(f"done: {result['epochs']} epochs, best dev rsum {result['best_rsum']} (epoch {result['best_epoch']}); "
          f"checkpoints in {a.out}")
    return result


def cli(argv=None) -> int:
    """Console-script entry point (``itm-train``): exit status 0 on success; a bad option, bad data, a corrupt
    checkpoint, a run folder in use or a diverging loss end with one line on stderr and exit status 2."""
    return run_main("itm-train", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
