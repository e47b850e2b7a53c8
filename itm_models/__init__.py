"""Models, data, metrics and evaluation for image-text matching, built on itm_kernels."""
from .checkpoints import load_checkpoint, load_official_checkpoint, save_checkpoint
from .losses import ContrastiveLoss
from .scan import SCAN, SCANConfig, SCANEnsemble

__all__ = ["SCAN", "SCANConfig", "SCANEnsemble", "ContrastiveLoss", "load_official_checkpoint", "load_checkpoint",
           "save_checkpoint"]
