"""Official SCAN checkpoints (``model_best.pth.tar`` of kuanghuei/SCAN): the builder that
:func:`itm_models.checkpoints.load_official_checkpoint` calls for model type ``"scan"`` (registered on import)."""
from __future__ import annotations

from ..checkpoints import CheckpointError, load_state_dict_checked, register_official_loader
from .config import SCANConfig
from .model import SCAN

__all__ = ["build_scan_from_official"]


def build_scan_from_official(opt: dict, state_dicts: list, path: str) -> SCAN:
    """SCAN from an official checkpoint's ``opt`` dict and ``model`` list ``[img_enc, txt_enc]`` (read from
    ``path``, named in errors); raises :class:`CheckpointError` for an invalid opt or weights that do not fit."""
    try:
        config = SCANConfig.from_opt(opt)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: its opt does not describe a valid SCAN model: {exc}") from None
    model = SCAN(config)
    hint = (f" (model built from opt: vocab_size={config.vocab_size}, word_dim={config.word_dim}, "
            f"embed_size={config.embed_size}, img_dim={config.img_dim}, bi_gru={config.bi_gru}, "
            f"num_layers={config.num_layers}, precomp_enc_type={config.precomp_enc_type!r})")
    load_state_dict_checked(model.img_enc, state_dicts[0], where="model[0] (img_enc)", path=path, hint=hint)
    load_state_dict_checked(model.txt_enc, state_dicts[1], where="model[1] (txt_enc)", path=path, hint=hint)
    return model


register_official_loader("scan", build_scan_from_official)
