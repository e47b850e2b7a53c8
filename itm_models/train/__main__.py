"""``python -m itm_models.train`` (deprecated): use ``itm-train`` or ``python -m itm_models.cli.train``."""
import warnings

warnings.warn("python -m itm_models.train moved to python -m itm_models.cli.train (or itm-train)", DeprecationWarning,
              stacklevel=1)

from ..cli.train import main  # noqa: E402

main()
