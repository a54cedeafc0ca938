"""User-facing errors: one line on stderr, non-zero exit, no traceback; and what the user asked for."""

from __future__ import annotations

import copy
import os
import sys
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import argparse


SIGPIPE_EXIT = 141  # what a shell reports for a command ended by SIGPIPE (128 + 13), as `cat` is under `| head`


def stdout_closed() -> None:
    """The reader of stdout went away (`| head`, `| less` then quit): exit quietly, as `cat` does.

    stdout is pointed at the null device first, so the interpreter's final flush cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout has no file descriptor (replaced in-process)
        pass
    sys.exit(SIGPIPE_EXIT)


# How to get torch without a multi-GB CUDA build (torch is only needed to convert checkpoints and compare speed).
TORCH_CPU_HINT = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


class UserError(Exception):
    """A problem with the user's input (file, flag, prompt, checkpoint), not a bug."""


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a command's main, turning UserError into a one-line message and exit code 1, and a closed stdout into
    a quiet exit."""
    try:
        main(argv)
    except BrokenPipeError:
        stdout_closed()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Destinations of the flags given on the command line (argv; sys.argv[1:] when None), defaults aside."""
    import argparse  # here, not at the top: the library (step.py, the sampler) must not need the CLI's modules

    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    print(f"warning: {message}", file=sys.stderr)
