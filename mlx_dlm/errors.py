"""User-facing errors: one line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (file, flag, prompt, checkpoint), not a bug."""


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a command's main, turning UserError into a one-line message and exit code 1."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
