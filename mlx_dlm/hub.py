"""Hugging Face Hub: resolve `user/repo` to a local model directory (uploading lives in upload.py)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens.json", "sampling.json", "README.md"]


def looks_like_repo_id(path: str) -> bool:
    """"user/repo": one slash, nothing local by that name, and not inside an existing local folder
    (`runs/typo` next to a `runs/` folder is a mistyped local path, not a Hub repository)."""
    parts = str(path).split("/")
    return (len(parts) == 2 and all(parts) and not Path(path).exists() and not Path(parts[0]).is_dir()
            and not str(path).startswith((".", "~")))


def resolve(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model directory for path: itself, or the Hub snapshot of a repo id (cache first when offline)."""
    if Path(path).is_dir() or not looks_like_repo_id(str(path)):
        return Path(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(str(path), revision=revision, allow_patterns=MODEL_FILES))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise UserError(f"{path} is not a local directory and not in the Hugging Face cache"
                        + (" (HF_HUB_OFFLINE is set: download it once online)" if offline else
                           " and could not be downloaded")) from None
    except RepositoryNotFoundError:
        raise UserError(f"{path} is not a local directory, and the Hub has no such model repository") from None
    except (HfHubHTTPError, OSError) as err:
        raise UserError(f"cannot download {path} from the Hub ({str(err).splitlines()[0]})") from None
