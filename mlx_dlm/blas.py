"""Load OpenBLAS ahead of MLX on Linux.

The Linux mlx-cpu wheel links the reference BLAS, whose sgemm is ~30x slower than
OpenBLAS. Loading an OpenBLAS with RTLD_GLOBAL before `mlx.core` is first imported
makes MLX's BLAS calls resolve to it. This module must not import mlx.

Environment: MLX_DLM_OPENBLAS=0 turns the switch off; MLX_DLM_OPENBLAS=/path/lib.so
loads that library instead of searching for one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import sys

ENV_VAR = "MLX_DLM_OPENBLAS"
FIX_HINT = "apt-get install libopenblas0-pthread"
_SEARCH_GLOBS = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

# What happened, for benchmarks and `mlx_dlm.blas_in_use()`: "openblas:<path>",
# "reference", "disabled", "too-late" or "not-linux".
status = "not-run"
_library = None  # the loaded OpenBLAS (for its thread count)


def find_openblas() -> str | None:
    """Path or soname of an installed OpenBLAS, or None."""
    for pattern in _SEARCH_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return ctypes.util.find_library("openblas")


def _warn(message: str) -> None:
    print(f"mlx_dlm: {message}", file=sys.stderr)


def use_openblas() -> str:
    """Load OpenBLAS globally if this is Linux and mlx.core is not imported yet.

    Returns the status string (also kept in `status`). Warns once, in one line,
    when MLX will run on the reference BLAS.
    """
    global status
    if status != "not-run":
        return status
    choice = os.environ.get(ENV_VAR, "").strip()
    if not sys.platform.startswith("linux"):
        status = "not-linux"
    elif choice.lower() in ("0", "false", "no", "off"):
        status = "disabled"
    elif "mlx.core" in sys.modules:
        status = "too-late"
        _warn("mlx.core was imported before mlx_dlm, so OpenBLAS could not be put under it; "
              "import mlx_dlm first for ~30x faster matmuls on Linux")
    else:
        path = choice if choice and choice.lower() not in ("1", "true", "yes", "on") else find_openblas()
        try:
            if path is None:
                raise OSError("no OpenBLAS found")
            global _library
            _library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            status = f"openblas:{path}"
        except OSError as err:
            status = "reference"
            _warn(f"MLX will use the slow reference BLAS ({err}); fix: {FIX_HINT} "
                  f"(or set {ENV_VAR}=0 to silence)")
    return status


def get_threads() -> int | None:
    """Threads the loaded OpenBLAS uses (None when it was not loaded or cannot say)."""
    fn = getattr(_library, "openblas_get_num_threads", None)
    return int(fn()) if fn is not None else None


@contextlib.contextmanager
def threads(n: int | None):
    """Run the block with the loaded OpenBLAS at n threads (None, or no OpenBLAS: unchanged), then restore."""
    before = get_threads() if n is not None else None
    setter = getattr(_library, "openblas_set_num_threads", None)
    if before is None or setter is None or before == n:
        yield
        return
    setter(n)
    try:
        yield
    finally:
        setter(before)
