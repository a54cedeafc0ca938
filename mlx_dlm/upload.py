"""`mlx_dlm.upload --path DIR --repo user/repo`: share a model directory on the Hugging Face Hub.

`upload` writes the model card (with `training_summary` of a trained directory) and pushes the model files;
`mlx_dlm.train --upload-repo` and `mlx_dlm.convert --upload-repo` call it too.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .errors import UserError, run_cli
from .hub import MODEL_FILES
from .io import load, read_config, write_model_card
from .model import Model


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
    """Create the repo if needed, write the model card and upload the model files; returns the repo URL.

    The Hub is contacted before anything is written, so an offline or refused upload leaves the directory as it
    was; its failure is a one-line UserError."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    model, tokenizer = load(directory)  # refuse to upload a broken directory
    api = HfApi()
    _hub_call(lambda: api.create_repo(repo, private=private, exist_ok=True), f"create {repo} on the Hub")
    summary = training_summary(directory)
    if summary or not (directory / "README.md").exists():  # a converter's card is kept as it is
        source = summary or [f"Source: {read_config(directory).get('source', 'unknown')}."]
        n_params = Model(model.args).num_params()  # the float count, also for quantized models
        write_model_card(directory, model.args, n_params, tokenizer, source, name=repo)
    _hub_call(lambda: api.upload_folder(folder_path=str(directory), repo_id=repo, revision=revision,
                                        allow_patterns=MODEL_FILES, commit_message="Upload mlx-dlm model"),
              f"upload {directory} to {repo}")
    return f"https://huggingface.co/{repo}"


def _hub_call(call, what: str):
    """Run a Hub request; network, offline-mode and HTTP failures become one line."""
    try:
        return call()
    except Exception as err:  # huggingface_hub raises its own, httpx's and OSError subclasses
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"cannot {what} ({type(err).__name__}: {first})") from None



def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of mlx_dlm.upload."""
    p = argparse.ArgumentParser(prog="mlx_dlm.upload", description="Upload a model directory to the Hub.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--path", required=True, help="model directory (trained or converted)")
    p.add_argument("--repo", required=True, help="Hub repository, user/name (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to upload to")
    return p


def _main(argv: list[str] | None) -> None:
    args = setup_arg_parser().parse_args(argv)
    print(f"Uploaded {args.path} to {upload(args.path, args.repo, args.private, args.revision)}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
