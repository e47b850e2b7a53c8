"""Deprecated: ``itm_kernels.reference`` moved to ``itm_kernels.xattn_sim.reference``; this shim re-exports it
for one release."""
import warnings

warnings.warn("itm_kernels.reference is deprecated; import from itm_kernels.xattn_sim.reference instead",
              DeprecationWarning, stacklevel=2)

from .xattn_sim.reference import *  # noqa: F401,F403
from .xattn_sim.reference import (  # noqa: F401,E402
    NORMS,
    AGGS,
    DIRECTIONS,
    EPS,
    LEAKY_SLOPE,
    _lengths_mask,
    normalize_scores,
    aggregate,
    attend_all_pairs,
    xattn_sim,
)


def __getattr__(name):
    # official_style_sims (and its helpers) moved to itm_models.baselines.scan; imported lazily so that importing
    # the kernels never imports itm_models.
    if name in ("official_style_sims", "_official_func_attention", "_official_cosine"):
        from itm_models.baselines import scan

        return getattr(scan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
