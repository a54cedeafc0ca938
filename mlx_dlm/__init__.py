"""mlx-dlm: masked diffusion language models in MLX."""

import sys
import types

# The BLAS switch must run before anything imports mlx.core.
from .blas import use_openblas as _use_openblas

_use_openblas()


class _Package(types.ModuleType):
    """`mlx_dlm.generate` is both a command module and the API function. Importing the submodule would make the
    package's `generate` attribute the module; this keeps it the function (the module stays in sys.modules), so the
    command module, and with it argparse, is loaded only by whoever runs or imports the command."""

    def __setattr__(self, name: str, value) -> None:
        if name == "generate" and isinstance(value, types.ModuleType) and "generate" in vars(self):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

from .errors import UserError  # noqa: E402
from .io import load, save_model  # noqa: E402
from .sample import generate, stream_generate  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "save_model", "generate", "stream_generate", "UserError", "blas_in_use", "__version__"]


def blas_in_use() -> str:
    """What BLAS the MLX CPU backend runs on, as decided at import time."""
    from . import blas

    return blas.status
