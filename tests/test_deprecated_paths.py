"""The pre-layout module paths of itm_kernels still import for one release, each with a DeprecationWarning, and
re-export the names callers used; the public names of the package are the functions, not the op packages."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import itm_kernels
from conftest import REPO

OLD_PATHS = {
    "itm_kernels.xattn": ["xattn_sim"],
    "itm_kernels.ops": ["xattn_sim_op", "xattn_sim_backward_op", "run_forward"],
    "itm_kernels.backends": ["load_extension", "available_backends", "build_info", "choose_backend",
                             "has_cpu_kernels", "has_cuda_kernels", "triton_importable"],
    "itm_kernels.cpu_backend": ["xattn_sim", "DIRECTION_CODES", "NORM_CODES", "AGG_CODES"],
    "itm_kernels.cuda_backend": ["xattn_sim", "supports", "MAX_REGIONS", "MAX_WORDS", "NORM_CODES"],
    "itm_kernels.torch_backend": ["xattn_sim", "xattn_sim_backward", "compute_dtype_for", "caption_chunks"],
    "itm_kernels.reference": ["xattn_sim", "NORMS", "AGGS", "DIRECTIONS", "EPS", "normalize_scores",
                              "official_style_sims"],
    "itm_kernels._validation": ["check_features", "check_lengths", "check_feature_pair", "FLOAT_DTYPES", "BACKENDS"],
    "itm_kernels.fast_mm": ["brgemm_available", "mm_float_out"],
}
TRITON_PATHS = {
    "itm_kernels.triton_xattn": ["xattn_sim", "kernel_config", "jit_kernel", "interpreted", "_gram",
                                 "_length_buckets", "_check_mode"],
    "itm_kernels.triton_local_sim": ["local_sim_triton", "kernel_config", "MAX_K"],
    "itm_kernels.triton_node_match": ["node_match_triton", "kernel_config", "MAX_ROWS"],
}


@pytest.mark.parametrize("path", sorted(OLD_PATHS))
def test_old_path_imports_with_deprecation_warning(path):
    sys.modules.pop(path, None)
    with pytest.warns(DeprecationWarning, match=path.replace(".", r"\.")):
        mod = importlib.import_module(path)
    for name in OLD_PATHS[path]:
        assert hasattr(mod, name), f"{path} lost {name}"


@pytest.mark.parametrize("path", sorted(TRITON_PATHS))
def test_old_triton_paths(path):
    pytest.importorskip("triton")
    sys.modules.pop(path, None)
    with pytest.warns(DeprecationWarning, match=path.replace(".", r"\.")):
        mod = importlib.import_module(path)
    for name in TRITON_PATHS[path]:
        assert hasattr(mod, name), f"{path} lost {name}"


def test_op_packages_reexport_the_old_module_names():
    """itm_kernels.local_sim and itm_kernels.node_match were modules; as packages they keep every name."""
    ls = importlib.import_module("itm_kernels.local_sim")
    for name in ["local_sim", "local_sim_cpu", "local_sim_gram", "local_sim_torch", "local_sim_reference",
                 "local_sim_op", "local_sim_backward_op", "local_sim_backward_torch", "_have_cpu_kernel", "_plan",
                 "_Tile", "_gram", "_packed_words", "_out_dtype", "EPS", "LEAKY_SLOPE", "BACKENDS",
                 "DEFAULT_LAMBDA_SOFTMAX", "DEFAULT_TILE_BYTES", "CUDA_MAX_K", "LOW_PRECISION_ROW_BUCKET"]:
        assert hasattr(ls, name), name
    nm = importlib.import_module("itm_kernels.node_match")
    for name in ["node_match", "node_match_reference", "node_match_torch", "node_match_cpu", "node_match_op",
                 "node_match_backward_op", "node_match_backward_torch", "_have_cpu_kernel", "_have_cuda_kernel",
                 "_tile", "_tile_gram", "_plan", "_tiles", "_blocked", "_block_cosine", "_out_dtype",
                 "GRAM_MIN_BLOCK_WIDTH", "CPU_NUM_BLOCKS", "CUDA_MAX_K", "DEFAULT_NUM_BLOCKS"]:
        assert hasattr(nm, name), name


def test_public_names_are_the_functions():
    import itm_kernels.local_sim.torch  # noqa: F401
    import itm_kernels.node_match.cpu  # noqa: F401
    import itm_kernels.xattn_sim.reference  # noqa: F401
    import itm_kernels.xattn_sim.torch  # noqa: F401

    for name in ("xattn_sim", "local_sim", "node_match"):
        fn = getattr(itm_kernels, name)
        assert callable(fn) and not isinstance(fn, type(itm_kernels)), name
        assert importlib.import_module(f"itm_kernels.{name}").__name__ == f"itm_kernels.{name}"


def test_new_paths_import_without_warnings_or_itm_models():
    """The kernels import cleanly from their new homes and never import itm_models (the reference shim's
    official_style_sims is lazy)."""
    code = ("import sys, warnings; warnings.simplefilter('error', DeprecationWarning); import itm_kernels; "
            "from itm_kernels.xattn_sim import reference, cpu, cuda; from itm_kernels.local_sim import cpu, cuda; "
            "from itm_kernels.node_match import cpu, cuda; from itm_kernels._common import fast_mm, validation; "
            "assert callable(itm_kernels.xattn_sim); assert 'itm_models' not in sys.modules")
    proc = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning:torch", "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
