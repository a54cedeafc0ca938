"""`mlx_dlm.benchmark [train|learn|profile|passes|layout|simple-dlm-sampler] ...`: decode throughput (DLM vs AR),
training speed (`train`), learning speed of recipes (`learn`), an op-level profile of a training step
(`profile`), the cost of one block-diffusion pass against an AR step (`passes`), what the CPU decode layout of the
weights buys (`layout`), or sampling speed against simple_dlm's own PyTorch sampler (`simple-dlm-sampler`)."""

from __future__ import annotations

import sys

from mlx_dlm.errors import run_cli

from . import layout, learn, pass_cost, profile, sampler_speed, throughput, train_speed


def _main(argv: list[str] | None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        train_speed.main(argv[1:])
    elif argv and argv[0] == "learn":
        learn.main(argv[1:])
    elif argv and argv[0] == "profile":
        profile.main(argv[1:])
    elif argv and argv[0] == "passes":
        pass_cost.main(argv[1:])
    elif argv and argv[0] == "layout":
        layout.main(argv[1:])
    elif argv and argv[0] == "simple-dlm-sampler":
        sampler_speed.main(argv[1:])
    else:
        throughput.main(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
