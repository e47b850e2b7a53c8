"""Models, data, metrics and evaluation for image-text matching, built on itm_kernels.

One home per model: :mod:`itm_models.scan`, :mod:`itm_models.sgraf`, :mod:`itm_models.gsmn` (each with its config,
layers / head, model and official-checkpoint import), :mod:`itm_models.tshsr` (our design after the paper's
abstract: no official code or checkpoints exist); :mod:`itm_models.baselines` (the official-style loops);
:mod:`itm_models.data`, :mod:`itm_models.eval`, :mod:`itm_models.train`, :mod:`itm_models.cli`; shared:
:mod:`itm_models.encoders`, :mod:`itm_models.losses`, :mod:`itm_models.checkpoints`,
:mod:`itm_models.config_utils`, :mod:`itm_models.devices`. Importing the package registers every model type with
:mod:`itm_models.checkpoints` (our format and the official one).
"""
from .checkpoints import CheckpointError, load_checkpoint, load_official_checkpoint, register_official_loader, \
    save_checkpoint
from .gsmn import GSMN, GSMNConfig, GSMNEnsemble, GSMNSimilarity, build_gsmn_from_official
from .losses import ContrastiveLoss
from .scan import SCAN, SCANConfig, SCANEnsemble
from .sgraf import SGRAF, SGRAFConfig, SGRAFEnsemble, SGRAFSimilarity, build_sgraf_from_official
from .tshsr import TSHSR, TSHSRConfig, TSHSREnsemble, TSHSRSimilarity

__all__ = ["SCAN", "SCANConfig", "SCANEnsemble", "SGRAF", "SGRAFConfig", "SGRAFEnsemble", "SGRAFSimilarity",
           "GSMN", "GSMNConfig", "GSMNEnsemble", "GSMNSimilarity", "ContrastiveLoss", "load_official_checkpoint",
           "load_checkpoint", "save_checkpoint", "TSHSR", "TSHSRConfig", "TSHSREnsemble", "TSHSRSimilarity"]
