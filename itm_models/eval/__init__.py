"""Evaluation: :mod:`.metrics` (recall, fold5, ensembles of matrices, the metric table; formerly
``itm_models.metrics``) and :mod:`.similarity` (the all-pairs similarity matrix of a split; formerly
``itm_models.evaluation``). The CLI ``itm-eval`` is :mod:`itm_models.cli.eval`.
"""
from .metrics import METRIC_KEYS, ensemble_sims, format_metrics_table, recall, recall_fold5
from .similarity import encode_images, gsmn_split, image_rows, is_graph_model, similarity_matrix

__all__ = ["recall", "recall_fold5", "ensemble_sims", "format_metrics_table", "METRIC_KEYS", "image_rows",
           "encode_images", "similarity_matrix", "is_graph_model", "gsmn_split"]
