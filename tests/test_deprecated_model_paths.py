"""The former module paths of ``itm_models`` (before the one-home-per-model layout) still import for one release,
with a DeprecationWarning that names the new home, and give the very objects of the new modules."""
from __future__ import annotations

import importlib
import sys

import pytest

# old module -> (new module, a name both must give)
MOVED = {
    "itm_models.evaluation": ("itm_models.eval.similarity", "similarity_matrix"),
    "itm_models.evaluate": ("itm_models.cli.eval", "main"),
    "itm_models.demo": ("itm_models.cli.demo", "main"),
    "itm_models.metrics": ("itm_models.eval.metrics", "recall_fold5"),
    "itm_models.gsmn_config": ("itm_models.gsmn.config", "GSMNConfig"),
    "itm_models.gsmn_data": ("itm_models.data.gsmn", "load_gsmn_split"),
    "itm_models.gsmn_geometry": ("itm_models.gsmn.geometry", "official_eval_boxes"),
    "itm_models.gsmn_official": ("itm_models.baselines.gsmn", "official_style_sims"),
    "itm_models.opt_fields": ("itm_models.config_utils", "opt_fields"),
    "itm_models.tokenize": ("itm_models.data.tokenize", "Vocabulary"),
    "itm_models.synthetic": ("itm_models.data.synthetic", "make_synthetic_dataset"),
}

# private names that tests and benchmarks used through the old paths
PRIVATE = {
    "itm_models.metrics": ("_RECALL_KEYS", "_BLOCK_ELEMENTS"),
    "itm_models.synthetic": ("main", "synthetic_boxes", "synthetic_parses"),
    "itm_models.evaluate": ("load_model", "evaluate"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_warns_and_aliases_the_new_one(old):
    new, name = MOVED[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    target = importlib.import_module(new)
    assert getattr(module, name) is getattr(target, name)
    for private in PRIVATE.get(old, ()):
        assert getattr(module, private) is getattr(target, private)


def test_packages_that_replace_modules_keep_the_old_names():
    import itm_models.cli.train
    import itm_models.data
    import itm_models.gsmn
    import itm_models.scan
    import itm_models.sgraf
    import itm_models.train

    for module, names in [
        (itm_models.scan, ("SCANConfig", "SCAN", "SCANEnsemble", "encode_and_score", "AGG_FUNCS",
                           "RAW_FEATURE_NORMS", "CROSS_ATTN")),
        (itm_models.sgraf, ("SGRAFSimilarity", "VisualSA", "TextSA", "SGRAFTextEncoder", "SGRAF", "SGRAFConfig",
                            "SGRAFEnsemble", "build_sgraf_from_official", "recipe_schedule", "RECIPE_SCHEDULES",
                            "MODULES", "NUM_REGIONS")),
        (itm_models.gsmn, ("GSMNSimilarity", "GSMN", "GSMNEnsemble", "official_eval_boxes", "normalize_boxes",
                           "parse_captions", "build_gsmn_from_official", "GSMNConfig")),
        (itm_models.data, ("DataFormatError", "PrecompDataset", "collate", "load_split_images",
                           "load_split_captions", "read_caption_lines", "load_vocab", "split_paths",
                           "precomp_loader", "OFFICIAL_DEV_CAPTIONS", "Vocabulary")),
        (itm_models.train, ("train", "train_step", "validate", "adjust_learning_rate", "epoch_generator",
                            "GSMNTrainSet", "GSMNBatch", "collate_gsmn", "CHECKPOINT_LAST", "CHECKPOINT_BEST")),
    ]:
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, (module.__name__, missing)
    # the CLI of the former itm_models.train module, loaded on first access
    for name in ("main", "cli", "_parser", "_resolve_model_options"):
        assert getattr(itm_models.train, name) is getattr(itm_models.cli.train, name)


@pytest.mark.parametrize("name", ["official_style_forward", "official_style_sims"])
def test_sgraf_baselines_through_the_old_module_warn(name):
    import itm_models.baselines.sgraf
    import itm_models.sgraf

    with pytest.warns(DeprecationWarning, match=f"itm_models.sgraf.{name} moved to itm_models.baselines.sgraf"):
        fn = getattr(itm_models.sgraf, name)
    assert fn is getattr(itm_models.baselines.sgraf, name)
