"""`mlx_dlm.benchmark layout`: what the CPU decode layout (`model.decode_layout`) buys, generation by generation.

    mlx_dlm.benchmark layout --ar shakespeare-ar --block shakespeare-block2 --out layout.json

Three settings: the AR model alone, the block model with its own defaults (its sampling.json), and the AR verifying
the block model's drafts (speculative, --draft-length or the drafter's own). Each generates --max-tokens after
--prompt (seed 0) twice per round: with its weights laid out for decoding (column-major, as `load` gives them on
the CPU) and row-major (as stored and as `nn.Linear` makes them), the order alternating by round, --repeats rounds,
after one warm-up of each (compilation), each run after a short pause (`machine.settle`). The median time per
generation is reported with the speed-up and each setting's speed against the AR's in the same layout; the text of
both layouts is compared (the same weights, summed in another order, so a sampled character could differ in
principle).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

import mlx_dlm
from mlx_dlm.errors import UserError
from mlx_dlm.io import load
from mlx_dlm.model import decode_layout

from .machine import add_blas_threads_flag, blas_threads, describe, machine_info, settle, write_results

LAYOUTS = ("decode", "row-major")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_dlm.benchmark layout", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ar", required=True, help="autoregressive model (directory or shipped name)")
    p.add_argument("--block", required=True, help="block-diffusion model (also the drafter)")
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--draft-length", type=int, help="K of the speculative setting (default: the drafter's own)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds")
    p.add_argument("--out", help="write the rows and machine info as JSON")
    add_blas_threads_flag(p)
    return p


def _pair(name: str) -> tuple[dict, object]:
    decode, tokenizer = load(name)
    standard, _ = load(name)
    decode_layout(standard, column_major=False)  # as stored, and as other backends keep them
    return {"decode": decode, "row-major": standard}, tokenizer


def run(args: argparse.Namespace) -> dict:
    if args.repeats < 1 or args.max_tokens < 1:
        raise UserError("--repeats and --max-tokens must be at least 1")
    if mx.default_device() != mx.cpu:
        raise UserError("the decode layout is applied on MLX's CPU backend only; this machine runs on "
                        f"{mx.default_device()}")
    ar, tokenizer = _pair(args.ar)
    block, _ = _pair(args.block)
    if ar["decode"].args.model_type != "ar" or block["decode"].args.model_type != "block":
        raise UserError("--ar takes an autoregressive model and --block a block-diffusion model")
    draft = {} if args.draft_length is None else {"draft_length": args.draft_length}
    settings = {
        "ar": lambda layout: mlx_dlm.generate(ar[layout], tokenizer, args.prompt, max_tokens=args.max_tokens, seed=0),
        "block": lambda layout: mlx_dlm.generate(block[layout], tokenizer, args.prompt, max_tokens=args.max_tokens,
                                                 seed=0),
        "speculative": lambda layout: mlx_dlm.generate(ar[layout], tokenizer, args.prompt, max_tokens=args.max_tokens,
                                                       seed=0, draft_model=block[layout], **draft)}
    texts = {(name, layout): generate(layout) for name, generate in settings.items() for layout in LAYOUTS}
    times = {key: [] for key in texts}
    for r in range(args.repeats):
        for name, generate in settings.items():
            for layout in (LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]):
                settle()
                tic = time.perf_counter()
                generate(layout)
                times[(name, layout)].append(time.perf_counter() - tic)
    ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    rows = [{"setting": name, **{f"{layout}_ms": ms[(name, layout)] for layout in LAYOUTS},
             "speedup": ms[(name, "row-major")] / ms[(name, "decode")],
             **{f"{layout}_x_ar": ms[("ar", layout)] / ms[(name, layout)] for layout in LAYOUTS},
             "same_text": texts[(name, "decode")] == texts[(name, "row-major")]} for name in settings]
    return {"machine": machine_info(), "args": vars(args), "rows": rows}


def report(results: dict) -> None:
    print(f"Machine: {describe(results['machine'])}; batch 1; {results['args']['max_tokens']} tokens after "
          f"{results['args']['prompt']!r}; median of {results['args']['repeats']} generations")
    print(f"{'setting':>12} {'row-major ms':>13} {'decode ms':>10} {'speed-up':>9} {'x AR, row-major':>16} "
          f"{'x AR, decode':>13} {'same text':>10}")
    for row in results["rows"]:
        print(f"{row['setting']:>12} {row['row-major_ms']:>13.1f} {row['decode_ms']:>10.1f} {row['speedup']:>9.2f} "
              f"{row['row-major_x_ar']:>16.2f} {row['decode_x_ar']:>13.2f} {str(row['same_text']):>10}")


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    with blas_threads(args.blas_threads):
        results = run(args)
    report(results)
    if args.out:
        write_results(args.out, results)
