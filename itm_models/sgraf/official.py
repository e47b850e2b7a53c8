"""Official SGRAF checkpoints (Paranioar/SGRAF ``model_best.pth.tar``: ``model`` = [img_enc, txt_enc, sim_enc]
state_dicts, loaded as they are since the module names are the official ones): :func:`build_sgraf_from_official`,
and the builder of :func:`itm_models.checkpoints.load_official_checkpoint` for model type ``"sgraf"`` (registered on
import)."""
from __future__ import annotations

from ..checkpoints import CheckpointError, register_official_loader
from .model import SGRAF

__all__ = ["build_sgraf_from_official"]


def build_sgraf_from_official(checkpoint: dict) -> SGRAF:
    """Rebuild an official SGRAF model from its checkpoint dict (``torch.load`` of ``model_best.pth.tar``, or
    :func:`itm_models.checkpoints.read_official_checkpoint`'s result): ``opt`` (Namespace or dict) gives the
    sizes, ``model`` = [img_enc, txt_enc, sim_enc] state_dicts, loaded strictly. Returns the model in eval mode.
    """
    opt = checkpoint["opt"]
    opt = dict(opt) if isinstance(opt, dict) else dict(vars(opt))
    module = opt.get("module_name", "SGR")
    model = SGRAF(vocab_size=int(opt["vocab_size"]), img_dim=int(opt.get("img_dim", 2048)),
                  word_dim=int(opt.get("word_dim", 300)), embed_size=int(opt.get("embed_size", 1024)),
                  sim_dim=int(opt.get("sim_dim", 256)), num_layers=int(opt.get("num_layers", 1)),
                  bi_gru=bool(opt.get("bi_gru", True)), no_imgnorm=bool(opt.get("no_imgnorm", False)),
                  no_txtnorm=bool(opt.get("no_txtnorm", False)), module=module,
                  sgr_step=int(opt.get("sgr_step", 3)))
    model.load_official_state_dicts(checkpoint["model"])
    return model.eval()


def _build_official_sgraf(opt: dict, state_dicts: list, path: str):
    try:
        return build_sgraf_from_official({"opt": opt, "model": state_dicts})
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the SGRAF weights do not fit the model its opt describes: {exc}") from None


register_official_loader("sgraf", _build_official_sgraf)
