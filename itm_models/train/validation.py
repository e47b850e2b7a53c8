"""Dev retrieval metrics during training (:func:`validate`, the official ``validate``): SCAN scored by
:func:`itm_models.scan.encode_and_score`, SGRAF and GSMN by :func:`itm_models.eval.similarity.similarity_matrix`."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ..data import PrecompDataset
from ..eval.metrics import recall
from ..eval.similarity import similarity_matrix
from ..gsmn import GSMN, GSMNEnsemble
from ..scan import SCAN, SCANEnsemble, encode_and_score
from ..sgraf import SGRAF, SGRAFEnsemble
from ..tshsr import TSHSR, TSHSREnsemble

__all__ = ["validate", "CAPTIONS_PER_IMAGE"]

CAPTIONS_PER_IMAGE = 5


class _ImageRows:
    """Rows ``rows`` of a (memory-mapped) feature array, read one slice at a time."""

    def __init__(self, images, rows: np.ndarray):
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.images[self.rows[sl]], dtype=np.float32))


def _pad_ids(captions: list) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in captions], dtype=torch.long)
    ids = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
    for i, c in enumerate(captions):
        ids[i, :len(c)] = torch.as_tensor(c, dtype=torch.long)
    return ids, lengths


def _similarity_matrix_of(model, dataset: PrecompDataset, n_cap: int, *, batch_size: int, device,
                          sims_dtype: torch.dtype | None) -> np.ndarray:
    """(n_cap // 5, n_cap) float32 dev scores of an SGRAF model or ensemble through
    :func:`itm_models.eval.similarity.similarity_matrix` (an ensemble: the mean of its members' matrices)."""
    view = SimpleNamespace(images=dataset.images, im_div=dataset.im_div, captions=dataset.captions[:n_cap])
    members = list(model.models) if isinstance(model, SGRAFEnsemble) else [model]
    total = None
    for m in members:
        s = similarity_matrix(m, view, batch_size=batch_size, device=device, dtype=sims_dtype or torch.float32,
                              captions_per_image=CAPTIONS_PER_IMAGE, progress=False)
        total = s if total is None else total + s
    return total / len(members)


def validate(model: SCAN | SGRAF | GSMN, dataset: PrecompDataset, *, batch_size: int = 128, device=None,
             backend: str | None = None, sims_dtype: torch.dtype | None = None, graph: dict | None = None) -> dict:
    """Dev retrieval metrics, as the official ``validate``: every image encoded once, every caption once, all pairs
    scored (no grad, in caption chunks), then :func:`itm_models.eval.metrics.recall`.

    Args:
        model: a :class:`SCAN` / :class:`SCANEnsemble` (scored by :func:`itm_models.scan.encode_and_score`), an
            :class:`SGRAF` / :class:`SGRAFEnsemble` or a :class:`itm_models.GSMN` / :class:`itm_models.GSMNEnsemble`
            (scored by :func:`itm_models.eval.similarity.similarity_matrix`); its train/eval mode is restored
            afterwards.
        dataset: a :class:`PrecompDataset`; its captions are cut to a multiple of 5, and caption ``5k .. 5k+4``
            are matched against the feature row of caption ``5k`` (as the official ``img_embs[::5]``).
        batch_size: encoder batch size. device / backend / sims_dtype: see
            :func:`itm_models.scan.encode_and_score` (float32 by default; ``torch.float64`` is the official SCAN
            precision, slower and rarely different in rank; SGRAF evaluates in float32 officially). ``backend``:
            SCAN's ``xattn_sim`` backend, or GSMN's ``node_match`` backend.
        graph: GSMN only: the split's graph inputs (``gsmn_split(data_dir, split)[1]``; ``dataset`` must be the
            matching dataset over GSMN's caption ids). Scored with correct geometry.

    Returns:
        dict with the keys of :func:`recall` (``i2t_r1`` ... ``rsum``) plus ``n_images`` and ``n_captions``.
    """
    n_cap = len(dataset.captions) - len(dataset.captions) % CAPTIONS_PER_IMAGE
    if n_cap == 0:
        raise ValueError(f"the {dataset.split} split has {len(dataset.captions)} captions; validation needs at least "
                         f"{CAPTIONS_PER_IMAGE}")
    rows = np.arange(0, n_cap, CAPTIONS_PER_IMAGE) // dataset.im_div
    if isinstance(model, (SCAN, SCANEnsemble)):
        ids, lengths = _pad_ids(dataset.captions[:n_cap])
        sims = encode_and_score(model, _ImageRows(dataset.images, rows), ids, lengths, batch_size=batch_size,
                                device=device, backend=backend, sims_dtype=sims_dtype)
    elif isinstance(model, (SGRAF, SGRAFEnsemble, GSMN, GSMNEnsemble, TSHSR, TSHSREnsemble)):
        is_gsmn = isinstance(model, (GSMN, GSMNEnsemble))
        if is_gsmn and graph is None:
            raise ValueError("validating GSMN needs graph=: the split's boxes, image sizes and parses "
                             "(itm_models.eval.similarity.gsmn_split(data_dir, split) returns (dataset, graph))")
        modes = [(m, m.training) for m in model.modules()]                  # similarity_matrix leaves eval mode
        try:
            if is_gsmn:
                view = SimpleNamespace(images=dataset.images, im_div=dataset.im_div, captions=dataset.captions[:n_cap])
                sims = similarity_matrix(model, view, graph=graph, batch_size=batch_size, device=device,
                                         dtype=sims_dtype or torch.float32, backend=backend or "auto",
                                         captions_per_image=CAPTIONS_PER_IMAGE, progress=False)
            else:
                sims = _similarity_matrix_of(model, dataset, n_cap, batch_size=batch_size, device=device,
                                             sims_dtype=sims_dtype)
        finally:
            for m, training in modes:
                m.training = training
    else:
        raise TypeError(f"model must be a SCAN, SCANEnsemble, SGRAF, SGRAFEnsemble, GSMN, GSMNEnsemble, TSHSR or "
                        f"TSHSREnsemble, got "
                        f"{type(model).__name__}")
    metrics = recall(sims, captions_per_image=CAPTIONS_PER_IMAGE)
    metrics["n_images"], metrics["n_captions"] = len(rows), n_cap
    return metrics
