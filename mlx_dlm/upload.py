"""`mlx_dlm.upload --path DIR --repo user/repo`: share a model directory on the Hugging Face Hub."""

from __future__ import annotations

import argparse

from .errors import run_cli
from .hub import upload


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of mlx_dlm.upload."""
    p = argparse.ArgumentParser(prog="mlx_dlm.upload", description="Upload a model directory to the Hub.")
    p.add_argument("--path", required=True, help="model directory (trained or converted)")
    p.add_argument("--repo", required=True, help="Hub repository, user/name (created if needed)")
    p.add_argument("--private", action="store_true")
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
