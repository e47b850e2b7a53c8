"""Models, data, metrics and evaluation for image-text matching, built on itm_kernels."""
from .checkpoints import CheckpointError, load_checkpoint, load_official_checkpoint, register_official_loader, \
    save_checkpoint
from .gsmn import GSMN, GSMNEnsemble, GSMNSimilarity, build_gsmn_from_official
from .gsmn_config import GSMNConfig
from .losses import ContrastiveLoss
from .scan import SCAN, SCANConfig, SCANEnsemble
from .sgraf import SGRAF, SGRAFConfig, SGRAFEnsemble, SGRAFSimilarity, build_sgraf_from_official


def _build_official_sgraf(opt: dict, state_dicts: list, path: str):
    try:
        return build_sgraf_from_official({"opt": opt, "model": state_dicts})
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the SGRAF weights do not fit the model its opt describes: {exc}") from None


def _build_official_gsmn(opt: dict, state_dicts: list, path: str):
    try:
        return build_gsmn_from_official({"opt": opt, "model": state_dicts})
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the GSMN weights do not fit the model its opt describes: {exc}") from None


register_official_loader("sgraf", _build_official_sgraf)
register_official_loader("gsmn", _build_official_gsmn)

__all__ = ["SCAN", "SCANConfig", "SCANEnsemble", "SGRAF", "SGRAFConfig", "SGRAFEnsemble", "SGRAFSimilarity",
           "GSMN", "GSMNConfig", "GSMNEnsemble", "GSMNSimilarity", "ContrastiveLoss", "load_official_checkpoint", "load_checkpoint", "save_checkpoint"]
