"""`mlx_dlm.benchmark <what>`: train (training speed)."""

from __future__ import annotations

import sys

from mlx_dlm.errors import run_cli

from . import train_speed

COMMANDS = {"train": train_speed.main}
USAGE = f"usage: mlx_dlm.benchmark {{{','.join(COMMANDS)}}} [options]"


def _main(argv: list[str] | None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
