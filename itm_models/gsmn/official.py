"""Official GSMN checkpoints (``model`` = [img_enc, txt_enc, i2t_match_G, t2i_match_G] state_dicts):
:func:`build_gsmn_from_official`, and the builder of :func:`itm_models.checkpoints.load_official_checkpoint` for
model type ``"gsmn"`` (registered on import)."""
from __future__ import annotations

from ..checkpoints import CheckpointError, register_official_loader
from .model import GSMN

__all__ = ["build_gsmn_from_official"]


def build_gsmn_from_official(checkpoint: dict, *, propagate: bool = False) -> GSMN:
    """Rebuild an official GSMN model from its checkpoint dict (``opt`` Namespace or dict, ``model`` =
    [img_enc, txt_enc, i2t_match_G, t2i_match_G]), weights loaded strictly; eval mode. The options are kept as a
    dict on ``model.official_opt`` (its ``batch_size`` decides the released evaluation's box divisions)."""
    opt = checkpoint["opt"]
    opt = dict(opt) if isinstance(opt, dict) else dict(vars(opt))
    model = GSMN(vocab_size=int(opt["vocab_size"]), variant="sparse" if opt.get("is_sparse") else "dense",
                 propagate=propagate, img_dim=int(opt.get("img_dim", 2048)), word_dim=int(opt.get("word_dim", 300)),
                 embed_size=int(opt.get("embed_size", 1024)), num_layers=int(opt.get("num_layers", 1)),
                 bi_gru=bool(opt.get("bi_gru", False)), no_imgnorm=bool(opt.get("no_imgnorm", False)),
                 no_txtnorm=bool(opt.get("no_txtnorm", False)),
                 lambda_softmax=float(opt.get("lambda_softmax", 20.0)), num_block=int(opt.get("num_block", 16)),
                 feat_dim=int(opt.get("feat_dim", 16)), hid_dim=int(opt.get("hid_dim", 32)),
                 out_dim=int(opt.get("out_dim", 1)))
    entries = checkpoint["model"]
    if len(entries) != 4:
        raise ValueError(f"a GSMN model list has 4 state_dicts [img_enc, txt_enc, i2t_match_G, t2i_match_G], got "
                         f"{len(entries)}")
    for name, module, sd in zip(("img_enc", "txt_enc", "i2t_match_G", "t2i_match_G"),
                                (model.img_enc, model.txt_enc, model.sim.i2t_match_G, model.sim.t2i_match_G),
                                entries):
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"model list entry {name} does not fit the model built from opt: {exc}") from None
    model.official_opt = opt
    return model.eval()


def _build_official_gsmn(opt: dict, state_dicts: list, path: str):
    try:
        return build_gsmn_from_official({"opt": opt, "model": state_dicts})
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the GSMN weights do not fit the model its opt describes: {exc}") from None


register_official_loader("gsmn", _build_official_gsmn)
