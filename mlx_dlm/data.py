"""Corpus resolution, train/validation split and random batch windows.

Without --data the corpus is Tiny Shakespeare: the gzipped copy shipped in the package (works offline), or,
in an installation without it, the cached download."""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_write_bytes

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt"
CACHE_ENV = "MLX_DLM_CACHE"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # the shipped corpus (and reference models: io.py)
PACKAGED_CORPUS = "tinyshakespeare.txt.gz"
DEFAULT_VAL_FRACTION = 0.1


def cache_dir() -> Path:
    """Where corpora are cached: $MLX_DLM_CACHE, else ~/.cache/mlx_dlm."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlx_dlm")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tiny_shakespeare_path() -> Path:
    """The cached Tiny Shakespeare file, downloading and verifying it on first use."""
    path = cache_dir() / TINY_SHAKESPEARE_FILE
    if path.exists():
        if _sha256(path.read_bytes()) != TINY_SHAKESPEARE_SHA256:
            raise UserError(f"cached corpus {path} fails its sha256 check: delete it to download again, "
                            "or pass --data PATH")
        return path
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except OSError as err:
        raise UserError(f"cannot download Tiny Shakespeare ({getattr(err, 'reason', err)}); "
                        f"pass --data PATH, or place the file at {path}") from None
    if _sha256(data) != TINY_SHAKESPEARE_SHA256:
        raise UserError("downloaded Tiny Shakespeare fails its sha256 check; pass --data PATH")
    atomic_write_bytes(path, data)
    return path


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


def packaged_tiny_shakespeare() -> str | None:
    """Tiny Shakespeare from the copy shipped in the package (gzipped, sha256-checked); None if absent."""
    path = ASSETS_DIR / PACKAGED_CORPUS
    if not path.exists():
        return None
    raw = gzip.decompress(path.read_bytes())
    if _sha256(raw) != TINY_SHAKESPEARE_SHA256:
        raise UserError(f"the packaged corpus {path} fails its sha256 check: reinstall mlx-dlm, or pass --data PATH")
    return raw.decode("utf-8")


def read_corpus(data: str | os.PathLike | None = None) -> str:
    """Text of a file, of a folder of .txt files (sorted, joined by newlines), or of Tiny Shakespeare
    (the packaged copy; else the cache, downloading on first use)."""
    if data is None:
        text = packaged_tiny_shakespeare()
        return text if text is not None else _read_utf8(tiny_shakespeare_path())
    path = Path(data)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise UserError(f"data folder {path} holds no .txt files")
        text = "\n".join(_read_utf8(f) for f in files)
    elif path.exists():
        text = _read_utf8(path)
    else:
        raise UserError(f"data file {path} does not exist")
    if not text:
        raise UserError(f"data {path} is empty")
    return text


def split_tokens(tokens: np.ndarray, val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Train on the first part, validate on the last val_fraction."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    cut = len(tokens) - int(round(len(tokens) * val_fraction))
    return tokens[:cut], tokens[cut:]


def check_window(tokens: np.ndarray, seq_len: int, name: str) -> None:
    """A split must hold at least one window of seq_len tokens."""
    if len(tokens) < seq_len:
        raise UserError(f"{name} data has {len(tokens)} tokens, fewer than one window of --seq-len {seq_len}; "
                        "use more text or a shorter --seq-len")


def random_windows(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """A (batch_size, seq_len) int32 batch of windows starting at uniform random offsets."""
    starts = rng.integers(0, len(tokens) - seq_len + 1, size=batch_size)
    return tokens[starts[:, None] + np.arange(seq_len)]


def eval_windows(tokens: np.ndarray, count: int, seq_len: int, seed: int = 1234) -> np.ndarray:
    """A fixed set of windows (same every call) so validation losses are comparable across steps."""
    return random_windows(tokens, count, seq_len, np.random.default_rng(seed))
