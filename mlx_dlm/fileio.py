"""Atomic file writes (a temp file in the same folder, fsync, then os.replace), and output folders.

`write_point()` marks each step of a write; with MLX_DLM_FAULT_AT=N in the environment (set by the crash
tests only) the process dies at once, as under kill -9, at the N-th point reached while it is set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError

FAULT_ENV = "MLX_DLM_FAULT_AT"
_points_reached = 0


def write_point() -> None:
    """A point between two file operations where a crash must leave readable files behind (see module doc)."""
    global _points_reached
    at = os.environ.get(FAULT_ENV)
    if at is None:
        return
    _points_reached += 1
    if _points_reached == int(at):
        os._exit(137)  # no cleanup, no flush: what kill -9 leaves


def ensure_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create a folder (and its parents) or say in one line why it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file" if blocker else (err.strerror or type(err).__name__)
        raise UserError(f"cannot create {what} {path}: {reason}") from None
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) and move the result over path, so readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        write_point()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        write_point()
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace path with data."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace path with UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))
