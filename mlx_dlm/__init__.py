"""mlx-dlm: masked diffusion language models in MLX."""

import warnings

# The BLAS switch must run before anything imports mlx.core.
from .blas import use_openblas as _use_openblas

_use_openblas()

# `mlx_dlm.generate` is both a command module and the API function; the module is imported first so that
# the function's name wins. `python -m mlx_dlm.generate` then finds the module already imported, which is
# intended here: silence runpy's warning about it (only that one).
warnings.filterwarnings("ignore", message="'mlx_dlm.generate' found in sys.modules", category=RuntimeWarning)
from . import generate as _generate_command  # noqa: E402,F401
from .errors import UserError  # noqa: E402
from .io import load, save_model  # noqa: E402
from .sample import generate, stream_generate  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "save_model", "generate", "stream_generate", "UserError", "blas_in_use", "__version__"]


def blas_in_use() -> str:
    """What BLAS the MLX CPU backend runs on, as decided at import time."""
    from . import blas

    return blas.status
