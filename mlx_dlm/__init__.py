"""mlx-dlm: masked diffusion language models in MLX."""

# The BLAS switch must run before anything imports mlx.core.
from .blas import use_openblas as _use_openblas

_use_openblas()

from . import generate as _generate_command  # noqa: E402,F401  (load the module before the function shadows its name)
from .errors import UserError  # noqa: E402
from .io import load, save_model  # noqa: E402
from .sample import generate, stream_generate  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "save_model", "generate", "stream_generate", "UserError", "blas_in_use", "__version__"]


def blas_in_use() -> str:
    """What BLAS the MLX CPU backend runs on, as decided at import time."""
    from . import blas

    return blas.status
