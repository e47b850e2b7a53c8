"""Deprecated: ``itm_models.gsmn_geometry`` moved to :mod:`itm_models.gsmn.geometry` (this alias goes in the next release)."""
import warnings

warnings.warn("itm_models.gsmn_geometry moved to itm_models.gsmn.geometry", DeprecationWarning, stacklevel=2)

from .gsmn.geometry import *  # noqa: E402,F401,F403
from .gsmn.geometry import EPS, KERNEL_EPS, check_boxes, check_image_sizes, pseudo_coordinates, gaussian_kernel_weights, official_division_counts, official_eval_boxes, check_parses, sparse_adjacency, word_affinity, textual_kernel_weights, normalize_boxes, _divide_repeatedly  # noqa: E402,F401
