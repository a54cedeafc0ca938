"""`mlx_dlm <command> ...`: one entry point for every command."""

from __future__ import annotations

import importlib
import sys

from .errors import stdout_closed

COMMANDS = {
    "train": "mlx_dlm.train",
    "generate": "mlx_dlm.generate",
    "eval": "mlx_dlm.eval",
    "chat": "mlx_dlm.chat",
    "server": "mlx_dlm.server",
    "export": "mlx_dlm.export",
    "benchmark": "mlx_dlm.benchmark.__main__",
    "convert": "mlx_dlm.convert.__main__",
    "upload": "mlx_dlm.upload",
}


USAGE = f"usage: mlx_dlm {{{','.join(COMMANDS)}}} [options]   (mlx_dlm COMMAND --help lists a command's options)"


def main(argv: list[str] | None = None) -> None:
    """Dispatch to the command's own main()."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        try:
            print(USAGE, flush=True)
        except BrokenPipeError:
            stdout_closed()
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])

if __name__ == "__main__":
    main()
