"""Hugging Face Hub: resolve `user/repo` to a local model directory, upload model directories."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UserError

MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "README.md"]


def looks_like_repo_id(path: str) -> bool:
    """"user/repo": one slash, no local path by that name."""
    parts = str(path).split("/")
    return len(parts) == 2 and all(parts) and not Path(path).exists() and not str(path).startswith((".", "~"))


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


def training_summary(directory: Path) -> list[str]:
    """Model-card lines about training, from state.json and metrics.jsonl when present."""
    lines = []
    state_path, metrics_path = directory / "state.json", directory / "metrics.jsonl"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        args = state.get("args", {})
        data = args.get("data") or "Tiny Shakespeare"
        lines.append(f"Trained with `mlx_dlm.train` for {state['step']} steps on {Path(str(data)).name} "
                     f"(batch {args.get('batch_size')} x {args.get('seq_len')}, {args.get('loss', 'elbo')} loss, "
                     f"{state.get('processes', 1)} process(es)).")
    if metrics_path.exists():
        vals = [json.loads(x) for x in metrics_path.read_text().splitlines() if '"val_loss"' in x]
        if vals:
            lines.append(f"Final validation loss: {vals[-1]['val_loss']:.4f} nats/token "
                         f"({vals[-1]['val_bpc']:.4f} bits/char) at step {vals[-1]['step']}.")
    return lines


def upload(directory: str | os.PathLike, repo: str, private: bool = False, revision: str | None = None) -> str:
    """Write the model card, create the repo if needed and upload the model files; returns the repo URL."""
    from huggingface_hub import HfApi

    from .io import load, read_config, write_model_card
    from .model import Model

    directory = Path(directory)
    model, tokenizer = load(directory)  # refuse to upload a broken directory
    summary = training_summary(directory)
    if summary or not (directory / "README.md").exists():  # a converter's card is kept as it is
        source = summary or [f"Source: {read_config(directory).get('source', 'unknown')}."]
        n_params = Model(model.args).num_params()  # the float count, also for quantized models
        write_model_card(directory, model.args, n_params, tokenizer, source, name=repo)
    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo, revision=revision,
                      allow_patterns=MODEL_FILES, commit_message="Upload mlx-dlm model")
    return f"https://huggingface.co/{repo}"
