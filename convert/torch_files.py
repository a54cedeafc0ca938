"""Safe reading of PyTorch checkpoints and pickled vocabularies."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np

from mlx_dlm.errors import TORCH_CPU_HINT, UserError


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception's first line, at most `limit` characters (its type's name when it has no message)."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


def load_torch(path: str | Path) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, no code runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        import torch
    except ImportError:
        raise UserError(f"converting PyTorch checkpoints needs torch, the CPU build is enough: {TORCH_CPU_HINT}") from None
    try:
        with warnings.catch_warnings():  # torch's warnings about foreign pickles would make the error two lines
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run the file's code: never pass it on.
        raise UserError(f"{path} was refused by the safe loader: it holds more than tensors and plain data "
                        "(is it a checkpoint? a meta.pkl goes to --meta)") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, ... for truncated or foreign files
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first_line(err)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def to_numpy(state_dict: dict) -> dict[str, np.ndarray]:
    """Tensors of a state dict as float32 numpy arrays (non-tensors are dropped)."""
    import torch

    return {k: v.detach().to(torch.float32).numpy() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


class _PlainUnpickler(pickle.Unpickler):
    """Admits only pickle's built-in containers, strings and numbers: any class or function is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def load_plain_pickle(path: str | Path) -> object:
    """Unpickle a file that must hold plain data only (dict, list, str, int, ...)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as err:
        raise UserError(f"{path} is not plain data ({first_line(err)}); refusing to unpickle it") from None
    except Exception as err:  # truncated or not a pickle at all
        raise UserError(f"{path} is not a readable pickle ({first_line(err)})") from None


def check_keys(source: str, found: set[str], expected: set[str]) -> None:
    """One-line error listing unexpected and missing keys when a layout does not match."""
    unexpected, missing = sorted(found - expected), sorted(expected - found)
    if unexpected or missing:
        def show(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "") if keys else "none"

        raise UserError(f"not a {source} checkpoint layout: unexpected keys: {show(unexpected)}; "
                        f"missing keys: {show(missing)}")
